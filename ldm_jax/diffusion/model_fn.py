"""Model functions as pytrees, so that jitted loops take them as arguments without retracing.

The samplers and likelihood code call `model_fn(x_t, t)`. A plain Python function is static for
`jax.jit` (hashed by identity; arrays it closes over are baked into the compiled program). A
`jax.tree_util.Partial` is a pytree whose bound arguments are traced leaves: pass
`Partial(apply_fn, params, context)` and new params or prompts reuse the compiled program.
"""
from __future__ import annotations

from jax.tree_util import Partial


def as_pytree_fn(fn) -> Partial:
    """Wrap `fn` in a `Partial` (a no-op if it already is one), so it can cross a jit boundary."""
    return fn if isinstance(fn, Partial) else Partial(fn)
