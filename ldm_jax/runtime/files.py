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
    """A .safetensors file as numpy arrays in their stored dtypes (bfloat16 as ml_dtypes')."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except TypeError as e:  # numpy has no bfloat16: safetensors.numpy refuses BF16 tensors
        if "bfloat16" not in str(e):
            raise ValueError(f"{what}{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{what}{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    return _load_safetensors_with_bfloat16(path, what)


def _load_safetensors_with_bfloat16(path: pathlib.Path, what: str) -> dict[str, np.ndarray]:
    """The safetensors format read directly (an 8-byte little-endian header length, a JSON header
    of {name: {dtype, shape, data_offsets}}, the data), for files holding BF16 tensors."""
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
    data = path.read_bytes()
    out = {}
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in dtypes:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which is not supported")
            begin, end = entry["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + begin:8 + n + end],
                                      dtypes[entry["dtype"]]).reshape(entry["shape"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what}{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    return out


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
    return read_safetensors_index(index), index


def read_safetensors_index(index: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a sharded checkpoint: its `.index.json`'s `weight_map` {tensor: shard file},
    every shard read from the index's folder. Raises naming the index and the missing shard, or a
    tensor the index lists that its shard does not hold."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map'")
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"missing {path} (listed in {index})")
        tensors = load_safetensors(path)
        for key in sorted(k for k, v in weight_map.items() if v == shard):
            if key not in tensors:
                raise ValueError(f"{index} lists tensor {key!r} in {shard}, which does not hold it")
        state.update(tensors)
    return state
