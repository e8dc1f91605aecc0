"""The optimiser from the `optim` config group: AdamW, warm-up then constant or cosine, global-norm
clipping, and gradient accumulation through optax.MultiSteps."""
from __future__ import annotations

import optax

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown optim.schedule {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float | None = 1.0, grad_accum: int = 1) -> optax.GradientTransformation:
    """AdamW with the schedule above, clipped by global norm; `grad_accum` > 1 averages that many
    micro-batches' gradients before each update (optax.MultiSteps; the schedule counts updates)."""
    chain = []
    if grad_clip:
        chain.append(optax.clip_by_global_norm(grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(lr, warmup_steps, total_steps, schedule),
                             b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*chain)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx
