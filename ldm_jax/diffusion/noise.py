"""Noise for the samplers: one key for a batch, or one key per example.

With a batch of keys, example b's noise is drawn from key b alone, so an example's result does not
depend on the rest of its batch (what lets a batch of prompts reproduce single-prompt images).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def batched_keys(rng) -> bool:
    """Whether `rng` is a batch of keys (typed keys [B], or raw uint32 keys [B, 2])."""
    return jnp.ndim(rng) > (0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1)


def split(rng, n):
    """n keys from one key ([n, ...]), or from a batch of keys ([n, B, ...], per example)."""
    if batched_keys(rng):
        return jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(rng)
    return jax.random.split(rng, n)


def normal(rng, shape):
    """N(0, I) of `shape`; with a batch of keys, example b drawn from key b alone."""
    if batched_keys(rng):
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(rng)
    return jax.random.normal(rng, shape, jnp.float32)
