"""The training state and the one update rule every stage uses.

`apply_gradients` applies an optax update, keeps an EMA of the parameters and skips the update
(parameters, optimiser state and EMA untouched) when the loss or any gradient is non-finite,
counting such steps so the loop can stop after too many in a row.

Flat updates (`TrainState.create(..., flat=True)`): the optimiser works on one vector holding
every trainable parameter (its state, e.g. Adam's moments, is stored flat too), and the EMA and
the skip-on-non-finite select run on that vector as well. A few large elementwise ops replace
several per parameter array: on CPU, with ~300 arrays, the per-array ops of clipping, AdamW, EMA
and the select were most of a small model's step time and two thirds of its compile time. Use it
where the parameters are replicated; with parameters sharded over `fsdp` the concatenation
would gather them, so the sharded configs keep the per-array (tree) update.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ldm_jax import optim


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a pytree, donated to the jitted step.

    params / ema_params: the trainable parameters ({"unet": ..., "text_encoder": ...} or
      {"autoencoder": ...}); opt_state: optax state for params; rng: the run's base key (each step
      folds in the step number); nonfinite: updates skipped so far; nonfinite_streak: skipped in a
      row now; max_nonfinite_streak: the longest such run (checked by the loop at logging steps);
      extra: stage-specific state (the timestep sampler's); discriminator: the autoencoder
      stage's adversary (its own parameters, statistics and optimiser state), or None;
      frozen_paths: static; parameter subtrees (key paths such as ("text_encoder", "embeddings",
      "token_embedding")) kept in params and ema_params but never optimised: no gradient, no
      optimiser state, no EMA update (see `split_params`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    nonfinite: jax.Array
    nonfinite_streak: jax.Array
    max_nonfinite_streak: jax.Array
    extra: Any = None
    discriminator: Any = None
    frozen_paths: tuple = flax.struct.field(pytree_node=False, default=())
    flat: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng, extra=None,
               frozen_paths: tuple = (), flat: bool = False, discriminator=None) -> "TrainState":
        frozen_paths = tuple(tuple(p) for p in frozen_paths)
        trainable = split_params(params, frozen_paths)[0]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(ravel_pytree(trainable)[0] if flat else trainable),
            ema_params=jax.tree.map(jnp.copy, params),
            rng=rng,
            nonfinite=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
            max_nonfinite_streak=jnp.zeros((), jnp.int32),
            extra=extra,
            discriminator=discriminator,
            frozen_paths=frozen_paths,
            flat=bool(flat),
        )


def split_params(params, frozen_paths) -> tuple[dict, dict]:
    """(trainable, fixed): the nested dict `params` cut into the subtrees under `frozen_paths` and
    the rest; `merge_params` puts them back together. With no frozen paths: (params, {})."""
    if not frozen_paths:
        return params, {}
    flat = flax.traverse_util.flatten_dict(params)
    missing = [p for p in frozen_paths if not any(k[:len(p)] == tuple(p) for k in flat)]
    if missing:
        raise KeyError(f"frozen parameter path {'/'.join(missing[0])} is not in the parameters")
    is_fixed = lambda k: any(k[:len(p)] == tuple(p) for p in frozen_paths)
    trainable = {k: v for k, v in flat.items() if not is_fixed(k)}
    fixed = {k: v for k, v in flat.items() if is_fixed(k)}
    return flax.traverse_util.unflatten_dict(trainable), flax.traverse_util.unflatten_dict(fixed)


def merge_params(trainable: dict, fixed: dict) -> dict:
    """The inverse of `split_params`."""
    if not fixed:
        return trainable
    flat = flax.traverse_util.flatten_dict(trainable)
    flat.update(flax.traverse_util.flatten_dict(fixed))
    return flax.traverse_util.unflatten_dict(flat)


def ema_decay_at(step, decay: float, warmup: bool = True):
    """EMA decay at `step`: min(decay, (1 + step) / (10 + step)) with warm-up (as LDM / diffusers)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def all_finite(*trees) -> jax.Array:
    """True when every leaf of every tree is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def select_tree(pred, on_true, on_false):
    """Leafwise jnp.where(pred, a, b) for two pytrees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def apply_gradients(state: TrainState, grads, loss, tx: optax.GradientTransformation, *,
                    ema_decay: float = 0.9999, ema_warmup: bool = True, extra=None,
                    discriminator=None) -> tuple[TrainState, dict]:
    """One optimiser step with EMA, skipped entirely when `loss` or `grads` are not finite.

    `grads` covers the trainable parameters only (`split_params(state.params, state.frozen_paths)[0]`);
    frozen subtrees pass through unchanged.

    `extra` and `discriminator` (optional) are the new stage-specific and discriminator states,
    kept only when the step is taken.
    Returns (new_state, {"grad_norm", "finite"}).
    """
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    trainable, fixed = split_params(state.params, state.frozen_paths)
    ema_trainable, ema_fixed = split_params(state.ema_params, state.frozen_paths)
    if state.flat:
        return _apply_flat(state, grads, loss, tx, decay, trainable, fixed, ema_trainable, ema_fixed, extra,
                           discriminator)
    finite = all_finite(loss, grads)
    if isinstance(tx, optim.AdamW):  # the same update, fused leaf by leaf
        return _apply_fused(state, grads, tx, decay, finite, trainable, fixed, ema_trainable, ema_fixed, extra,
                            discriminator)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)  # no NaN into optax
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params = merge_params(trainable, fixed)
    ema = merge_params(jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_trainable, trainable),
                       ema_fixed)
    taken = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        nonfinite_streak=jnp.zeros((), jnp.int32),
        extra=state.extra if extra is None else extra,
        discriminator=state.discriminator if discriminator is None else discriminator,
    )
    new_state = select_tree(finite, taken, _skipped(state))
    return new_state, {"grad_norm": optax.tree.norm(grads), "finite": finite}


def _skipped(state: TrainState) -> TrainState:
    """The state after a skipped (non-finite) update: only the step and the counters move."""
    return state.replace(
        step=state.step + 1,
        nonfinite=state.nonfinite + 1,
        nonfinite_streak=state.nonfinite_streak + 1,
        max_nonfinite_streak=jnp.maximum(state.max_nonfinite_streak, state.nonfinite_streak + 1),
    )


def _apply_fused(state, grads, tx, decay, finite, trainable, fixed, ema_trainable, ema_fixed, extra, discriminator):
    """apply_gradients through `optim.AdamW.apply`: the tree update's arithmetic without the copies
    of whole trees XLA makes of optax's chain (see optim.AdamW)."""
    trainable, opt_state, grad_norm = tx.apply(grads, state.opt_state, trainable, finite)
    ema_trainable = jax.tree.map(lambda e, p: _ema_step(e, p, decay, finite), ema_trainable, trainable)
    return _counted(state, finite).replace(
        params=merge_params(trainable, fixed),
        ema_params=merge_params(ema_trainable, ema_fixed),
        opt_state=opt_state,
        extra=select_tree(finite, state.extra if extra is None else extra, state.extra),
        discriminator=select_tree(finite, state.discriminator if discriminator is None else discriminator,
                                  state.discriminator),
    ), {"grad_norm": grad_norm, "finite": finite}


def _ema_step(ema, params, decay, finite):
    """The EMA after an update to `params`, kept as it was where `finite` is false."""
    return jnp.where(finite, decay * ema + (1.0 - decay) * params, ema)


def _counted(state: TrainState, finite) -> TrainState:
    """`state` with the step and the non-finite counters moved on, the update taken or not."""
    skipped = _skipped(state)
    return state.replace(
        step=state.step + 1,
        nonfinite=skipped.nonfinite - finite.astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, skipped.nonfinite_streak),
        max_nonfinite_streak=jnp.where(finite, state.max_nonfinite_streak, skipped.max_nonfinite_streak),
    )


def _apply_flat(state, grads, loss, tx, decay, trainable, fixed, ema_trainable, ema_fixed, extra, discriminator):
    """apply_gradients on the raveled parameters (TrainState.flat): the same arithmetic, with
    the update, the EMA and the skip select as single-vector ops."""
    p, unravel = ravel_pytree(trainable)
    g, e = ravel_pytree(grads)[0], ravel_pytree(ema_trainable)[0]
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g))
    g = jnp.where(finite, g, 0.0)  # no NaN into optax
    updates, opt_state = tx.update(g, state.opt_state, p)
    new_p = jnp.where(finite, p + updates, p)
    new_e = _ema_step(e, new_p, decay, finite)
    new_state = _counted(state, finite).replace(
        params=merge_params(unravel(new_p), fixed),
        ema_params=merge_params(unravel(new_e), ema_fixed),
        opt_state=select_tree(finite, opt_state, state.opt_state),
        extra=select_tree(finite, state.extra if extra is None else extra, state.extra),
        discriminator=select_tree(finite, state.discriminator if discriminator is None else discriminator,
                                  state.discriminator),
    )
    return new_state, {"grad_norm": jnp.linalg.norm(g), "finite": finite}
