"""The small evaluation networks trained once on real data (the digit classifier, the shapes
feature CNN): their deterministic initialisation and their cache, `<cache>/<name>/<file>.npz`,
`<cache>` being `$LDM_JAX_CACHE` or `~/.cache/ldm_jax`: parameters and a few scalars in a plain
npz (no pickles), written atomically."""
from __future__ import annotations

import os
import tempfile

import flax
import jax
import numpy as np


def check_images(images, what: str) -> np.ndarray:
    """`images` as a uint8 numpy array [N, S, S, 3]; ValueError naming `what` otherwise."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{what} images must be [N, S, S, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{what} images must be uint8 (0..255), got dtype {images.dtype}")
    return images


def is_shape(x) -> bool:
    """Leaves of a tree of parameter shapes."""
    return isinstance(x, tuple)


def he_normal_params(shapes: dict, seed: int) -> dict:
    """Parameters for a tree of shapes: He-normal kernels (variance 2 / fan-in, for ReLUs), zero
    biases, from a numpy generator: the same numbers everywhere, and no compiled initialiser."""
    rng = np.random.default_rng(seed)

    def init(path, shape):
        if path[-1].key == "bias":
            return np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, shapes, is_leaf=is_shape)


def default_cache_dir() -> str:
    """`$LDM_JAX_CACHE`, or `~/.cache/ldm_jax`."""
    return os.path.expanduser(os.environ.get("LDM_JAX_CACHE", "~/.cache/ldm_jax"))


def save(path: str, params: dict, scalars: dict) -> None:
    """`params` (nested dict of arrays) as `params/<a>/<b>` entries and `scalars` as themselves;
    written then renamed, so a reader (or a crash mid-write) never sees half a file."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    arrays.update({k: np.asarray(v) for k, v in scalars.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: str, recipe_version: int) -> tuple[dict, dict]:
    """(params, the other entries as numpy scalars) of a file `save` wrote; ValueError if its
    recipe_version is not `recipe_version` (the network it holds is another recipe's)."""
    with np.load(path, allow_pickle=False) as f:
        if int(f["recipe_version"]) != recipe_version:
            raise ValueError(f"recipe version {int(f['recipe_version'])}, expected {recipe_version}")
        flat = {k[len("params/"):]: np.asarray(f[k]) for k in f.files if k.startswith("params/")}
        scalars = {k: f[k][()] for k in f.files if not k.startswith("params/")}
    return flax.traverse_util.unflatten_dict(flat, sep="/"), scalars
