"""The mechanical part of PyTorch <-> Flax weight conversion, shared by every model.

Our Flax parameter trees mirror the PyTorch module trees, so a state-dict key maps to a parameter
path by renaming: ModuleList items `resnets.0` <-> `resnets_0`, `weight` <-> `kernel` (transposed:
conv OIHW <-> HWIO, linear (out, in) <-> (in, out)) / `scale` (norms) / `embedding`.
State dicts are flat `{key: np.ndarray}`; nothing here imports torch.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import numpy as np

# diffusers ModuleList attributes: `resnets.0` <-> `resnets_0`. Other names with a digit suffix
# (`linear_1`, `conv1`) are plain attribute names and stay as they are.
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
               "transformer_blocks", "to_out", "net", "layers")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))


def torch_key(path: tuple[str, ...]) -> str:
    """Flax parameter path (module names..., leaf) -> the PyTorch state-dict key."""
    *modules, leaf = path
    parts = [_LIST_RE.sub(r"\1.\2", m) for m in modules]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def to_flax(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and w.ndim == 2:
        return w.T  # (out, in) -> (in, out)
    return w


def to_torch(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and w.ndim == 2:
        return w.T
    return w


def flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def params_from_state_dict(state_dict: Mapping[str, Any], expected: Mapping, what: str) -> dict:
    """Map a PyTorch state dict onto the Flax tree whose shapes ``expected`` gives.

    Raises ValueError listing missing, unexpected and mis-shaped keys (``what`` names the model).
    """
    flat = flatten(expected)
    keys = {torch_key(p): p for p in flat}
    missing = sorted(set(keys) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys))
    out, bad = {}, []
    for key, path in keys.items():
        if key not in state_dict:
            continue
        w = to_flax(path[-1], np.asarray(state_dict[key], dtype=np.float32))
        if tuple(w.shape) != tuple(flat[path].shape):
            bad.append(f"{key}: got {tuple(np.shape(state_dict[key]))}, expected shape "
                       f"{tuple(to_torch(path[-1], np.zeros(flat[path].shape)).shape)}")
            continue
        out[path] = w
    if missing or unexpected or bad:
        lines = [f"{what} state dict does not match the configuration:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if bad:
            lines.append(f"  mis-shaped ({len(bad)}): {bad[:20]}")
        raise ValueError("\n".join(lines))
    return unflatten(out)


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """Flax params -> ``{torch_key: float32 numpy array}``."""
    return {torch_key(path): np.ascontiguousarray(to_torch(path[-1], np.asarray(w, np.float32)))
            for path, w in flatten(params).items()}


def param_shapes(module, *example_args, **static_kwargs) -> dict:
    """Parameter shapes of ``module`` via ``jax.eval_shape`` (nothing is allocated).

    ``example_args`` are arrays or ``jax.ShapeDtypeStruct`` (or None); ``static_kwargs`` are
    passed as is. Cached per (module, argument shapes, kwargs): tracing a UNet's init takes
    about half a second, and every load of a folder or checkpoint asks again.
    """
    specs = tuple(None if a is None else jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in example_args)
    key = (module, specs, tuple(sorted(static_kwargs.items())))
    try:
        hash(key)
    except TypeError:  # an unhashable module field or kwarg: no caching
        return _param_shapes(module, specs, static_kwargs)
    return jax.tree.map(lambda s: s, _cached_param_shapes(*key))  # a fresh tree: callers may edit it


def _param_shapes(module, specs, static_kwargs) -> dict:
    variables = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **static_kwargs), *specs)
    return variables["params"]


@functools.lru_cache(maxsize=32)
def _cached_param_shapes(module, specs, kwargs_items) -> dict:
    return _param_shapes(module, specs, dict(kwargs_items))


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
