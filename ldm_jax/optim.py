"""The optimiser from the `optim` config group: AdamW, warm-up then constant or cosine, global-norm
clipping, and gradient accumulation through optax.MultiSteps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("constant", "cosine")
MU_DTYPES = ("float32", "bfloat16")


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
                   grad_clip: float | None = 1.0, grad_accum: int = 1,
                   mu_dtype: str = "float32") -> optax.GradientTransformation:
    """AdamW with the schedule above, clipped by global norm; `grad_accum` > 1 averages that many
    micro-batches' gradients before each update (optax.MultiSteps; the schedule counts updates).
    `mu_dtype` is the first moment's storage: "float32", or "bfloat16" (optax's mu_dtype, 2 bytes a
    parameter less; optax's update reads the new moment before rounding it, `AdamW.apply` reads
    the rounded one)."""
    if mu_dtype not in MU_DTYPES:
        raise ValueError(f"unknown optim.mu_dtype {mu_dtype!r}; allowed: {', '.join(MU_DTYPES)}")
    tx = AdamW(schedule=learning_rate_schedule(lr, warmup_steps, total_steps, schedule), b1=b1, b2=b2, eps=eps,
               weight_decay=weight_decay, grad_clip=grad_clip, mu_dtype=None if mu_dtype == "float32" else mu_dtype)
    if grad_accum > 1:
        return optax.MultiSteps(tx.chain, every_k_schedule=grad_accum)
    return tx


class AdamW:
    """`make_optimizer`'s transformation: optax's chain(clip_by_global_norm, adamw), used as one
    (`init` / `update` are the chain's, and so is the state), plus `apply`, which computes the same
    update leaf by leaf in two passes so that the step's peak holds the gradients and nothing more
    of the parameters' size (with no gradient accumulation: optax.MultiSteps wraps the chain).

    Through optax, XLA keeps whole trees alive between the chain's stages (the clipped gradients,
    which both moments and the update read; the updates; copies of donated moments that a later
    fusion reads after an earlier one overwrote them): 5.3 GiB at SD 1.5's 859.5M parameters on top
    of the gradients (benchmarks/memory.py). `apply` recomputes the clipped gradient inside each
    fusion that reads it and puts an optimisation barrier after each pass (both moments; then
    the parameters, which training/state.py's EMA reads), so each pass reads only what the one
    before wrote in place. Its
    arithmetic is optax's, op for op; the results agree to float32 rounding, not bitwise, because
    XLA's CPU code contracts a multiply and an add into one FMA in some fusions and not in others
    (tests/training/test_state.py).
    """

    def __init__(self, *, schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 grad_clip: float | None, mu_dtype: str | None = None):
        self.schedule, self.b1, self.b2, self.eps = schedule, b1, b2, eps
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
        chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype))
        self.chain = optax.chain(*chain)

    def init(self, params):
        return self.chain.init(params)

    def update(self, updates, state, params=None):
        return self.chain.update(updates, state, params)

    def apply(self, grads, state, params, finite):
        """(params, state, grad_norm) after one step on `grads`; every output is its input where
        `finite` is false."""
        adam_state, decay_state, lr_state = state[-1]
        # Where `finite` holds, the gradients are what optax would see; where not, every output is
        # its input, so unlike the tree update the gradients need no zeroing (which would make
        # XLA keep a zeroed copy of each).
        g_norm = optax.tree.norm(grads)
        if self.grad_clip:  # optax.clip_by_global_norm
            trigger = jnp.squeeze(g_norm < self.grad_clip)

            def clipped(g):
                return jax.lax.select(trigger, g, (g / g_norm.astype(g.dtype)) * self.grad_clip)
        else:
            clipped = lambda g: g  # noqa: E731
        b1, b2 = self.b1, self.b2
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        count = optax.safe_increment(adam_state.count)
        bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count  # optax.tree.bias_correction
        step_size = jnp.asarray(-1 * self.schedule(lr_state.count))  # optax.scale_by_learning_rate

        # pass 1: both moments (optax.scale_by_adam), written over the old ones. Each clips its
        # own name for the gradient: XLA would otherwise compute the clipped gradient (a division)
        # once and keep every leaf's until the last pass that reads it.
        def moments(g, mu, nu):
            g_mu, g_nu = map(clipped, jax.lax.optimization_barrier((g, g)))
            return jax.lax.optimization_barrier(
                (keep(((1 - b1) * (g_mu ** 1) + b1 * mu).astype(mu.dtype), mu),
                 keep((1 - b2) * (g_nu ** 2) + b2 * nu, nu)))

        new = jax.tree.map(moments, grads, adam_state.mu, adam_state.nu)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        mu = jax.tree.map(lambda t: t[0], new, is_leaf=is_pair)
        nu = jax.tree.map(lambda t: t[1], new, is_leaf=is_pair)

        # pass 2: the parameters from the stored moments (adamw's decayed weights, then the step).
        # With mu_dtype bfloat16 the update reads the rounded first moment; optax's reads it before
        # rounding, which would keep a float32 copy of it alive (tests/training/test_state.py
        # bounds the difference).
        def parameter(p, m, v):
            m = m.astype(v.dtype)
            u = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype) + 0.0) + self.eps)
            if self.weight_decay != 0.0:
                u = u + self.weight_decay * p
            u = jnp.array(step_size, dtype=u.dtype) * u
            return jax.lax.optimization_barrier(keep(jnp.asarray(p + u).astype(p.dtype), p))

        params = jax.tree.map(parameter, params, mu, nu)
        adam_state = adam_state._replace(count=keep(count, adam_state.count), mu=mu, nu=nu)
        lr_state = lr_state._replace(count=keep(optax.safe_increment(lr_state.count), lr_state.count))
        state = (*state[:-1], (adam_state, decay_state, lr_state))
        return params, state, jnp.where(finite, g_norm, 0.0)
