"""Reading weight and config files without unpickling: JSON configs, safetensors files (single or
sharded through a `.index.json`) and `.npz` archives, each failing with an error naming the file;
and importing a user's Python file (a config, a sweep) without writing beside it."""
from __future__ import annotations

import contextlib
import json
import pathlib
import sys

import numpy as np


@contextlib.contextmanager
def no_bytecode():
    """Within: imports write no __pycache__ (as with PYTHONDONTWRITEBYTECODE). For executing a
    user's config or sweep file: a run's folder holds only what ldm_jax writes on purpose, and a
    folder whose bytes are checked before and after stays as it was."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path: pathlib.Path, what: str = "") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{what}{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None


def load_npz(path: pathlib.Path, what: str = "") -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # not a zip, truncated, or object arrays (pickles: refused)
        raise ValueError(f"{what}{path}: cannot read as .npz without unpickling ({type(e).__name__}: {e})") from None


def read_safetensors_weights(folder: pathlib.Path, name: str
                             ) -> tuple[dict[str, np.ndarray], pathlib.Path] | None:
    """`folder/name` (a .safetensors file) or the shards its `name.index.json` lists: (state dict,
    the file it came from), or None when neither exists."""
    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():
        return load_safetensors(single), single
    if not index.is_file():
        return None
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map'")
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"missing {folder / shard} (listed in {index})")
        state.update(load_safetensors(folder / shard))
    return state, index
