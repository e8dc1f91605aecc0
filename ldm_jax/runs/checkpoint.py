"""Checkpoints of one training stage: orbax CheckpointManager under <workdir>/checkpoints/<stage>.

Each step saved holds the TrainState (params, EMA params, optimiser state, step, rng, ...), the
input pipeline's iterator state (so a resumed run sees exactly the batches it would have seen) and
JSON metadata (the config, the latent scale, ...). Restoring checks every parameter's shape against
the target first and names the first one that differs.

Damage. orbax writes a step into a temporary folder and renames it when complete, so a kill
during a save leaves no half-written step (the temporary folder is removed on the next start).
After each save we also write `MANIFEST` (every file of the step with its size), so that a step
damaged afterwards (truncated or partly deleted files, a full disk while copying) is recognised:
`verify` names the first missing or short file. A training run (`repair=True`) moves damaged
steps newer than the last complete one aside (`<step>.damaged`, nothing deleted) with a warning
and resumes from that one; if no complete step is left it stops with an error naming the files.
A failed save (disk full) raises CheckpointSaveError; the previous steps stay as they were.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("ldm_jax.train")

MANIFEST = "ldm_jax_manifest.json"


class ShapeMismatchError(ValueError):
    pass


class DamagedCheckpointError(ValueError):
    """A saved step whose files are missing or truncated (names the file)."""


class CheckpointSaveError(OSError):
    """A save that failed (e.g. no space left); the steps saved before are intact."""


def step_folders(directory: str) -> list[int]:
    """The steps saved under a stage's checkpoint folder (complete or damaged), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _files_with_sizes(folder: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if not rel.startswith(MANIFEST):  # the manifest and its temporary file
                out[rel] = os.path.getsize(path)
    return out


def write_manifest(folder: str) -> None:
    """Record every file of a saved step with its size (atomically: present means complete)."""
    sizes = _files_with_sizes(folder)
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify(folder: str) -> None:
    """Raise DamagedCheckpointError naming the first file of the step `folder` that its manifest
    lists and that is missing or has another size. A step saved before manifests existed (or
    by a process killed between orbax's commit and the manifest) is not checked here."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise DamagedCheckpointError(f"checkpoint {folder} is missing")
    if not os.path.isfile(manifest):
        return
    try:
        with open(manifest) as f:
            want = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(f"checkpoint {folder}: its manifest {manifest} is unreadable ({e})") from None
    for rel, size in sorted(want.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise DamagedCheckpointError(f"checkpoint {folder} is damaged: {path} is missing")
        have = os.path.getsize(path)
        if have != size:
            raise DamagedCheckpointError(f"checkpoint {folder} is damaged: {path} has {have} bytes, "
                                         f"{size} were saved (truncated)")


def damaged_newest(directory: str) -> list[tuple[int, str]]:
    """(step, why) of the damaged steps newer than the newest complete one, newest first. Raise
    DamagedCheckpointError when steps exist but none is complete."""
    steps = step_folders(directory)
    damaged = []
    for step in reversed(steps):
        folder = os.path.join(directory, str(step))
        try:
            verify(folder)
            break
        except DamagedCheckpointError as e:
            damaged.append((step, str(e)))
    else:
        if steps:
            raise DamagedCheckpointError(
                "no complete checkpoint is left: " + "; ".join(why for _, why in damaged)
                + f". Nothing was changed; to start the stage over, move {directory} aside")
    return damaged


def set_aside_damaged(directory: str) -> list[int]:
    """Move the damaged steps newer than the newest complete one to `<step>.damaged` (with a
    warning naming each); the steps left are complete. Raise DamagedCheckpointError when steps
    exist but none is complete (then nothing is moved). Returns the steps moved."""
    damaged = damaged_newest(directory)
    for step, why in damaged:
        target = os.path.join(directory, f"{step}.damaged")
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(directory, f"{step}.damaged.{suffix}"), suffix + 1
        os.replace(os.path.join(directory, str(step)), target)
        log.warning("%s; skipped it (kept as %s) and resuming from the last complete checkpoint", why, target)
    return [step for step, _ in damaged]


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (orbax wraps them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths_and_shapes(tree) -> list[tuple[str, tuple]]:
    """("params/unet/conv_in/kernel", shape) per leaf; dataclass fields and dict keys read alike,
    so a state's tree and the checkpoint's saved metadata tree compare."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_name(k) for k in path), tuple(np.shape(leaf))) for path, leaf in flat]


# Layouts of earlier versions, read into today's (see `StageCheckpoints.restore`): until
# 2026-12-03 the autoencoder stage's discriminator rode in state.extra.
MOVED = {"extra/disc_params": "discriminator/params", "extra/disc_batch_stats": "discriminator/batch_stats",
         "extra/disc_opt_state": "discriminator/opt_state"}


def _moved(path: str) -> str:
    for old, new in MOVED.items():
        if path == old or path.startswith(old + "/"):
            return new + path[len(old):]
    return path


def _as_dtype(value, dtype):
    """A saved array as `dtype`; typed PRNG keys (dtype key<impl>) are saved as their key data."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            return value
        return jax.random.wrap_key_data(np.asarray(value), impl=str(dtype)[len("key<"):-1])
    return np.asarray(value, dtype)


def _earlier_layout(saved) -> bool:
    return any(_moved(path) != path for path, _ in _paths_and_shapes(saved))


class StageCheckpoints:
    """Save / restore one stage's state, data iterator state and metadata."""

    def __init__(self, workdir: str, stage: str, keep: int = 2, repair: bool = False):
        """`repair` (the training loop, process 0): set damaged newest steps aside first (see
        the module docstring); readers leave the folder as it is."""
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints", stage)
        if repair:
            set_aside_damaged(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=repair),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Any = None, meta: dict | None = None) -> None:
        """Save `step` and its manifest; CheckpointSaveError (naming the folder and the last
        complete step) if the file system refuses."""
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                meta=ocp.args.JsonSave(meta or {}),
            ), force=True)
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_manifest(os.path.join(self.directory, str(step)))
        except Exception as e:  # noqa: BLE001 - only OS errors are translated; the rest propagate
            err = _os_error(e)
            if err is None:
                raise
            complete = [s for s in step_folders(self.directory) if s != step]
            raise CheckpointSaveError(
                err.errno, f"could not save checkpoint step {step} to {self.directory}: {err.strerror or err}; "
                f"the last complete checkpoint is step {complete[-1] if complete else None}") from e

    def check_shapes(self, target, step: int) -> None:
        """Raise ShapeMismatchError naming the first parameter whose saved shape differs from `target`."""
        saved = self._saved_metadata(step)
        want = dict(_paths_and_shapes(target))
        have = dict(_paths_and_shapes(saved))
        for path, shape in want.items():
            if path not in have:
                raise ShapeMismatchError(f"checkpoint {self.directory} step {step} has no entry {path} "
                                         f"(the config expects shape {shape}); was it written by another config?")
            if have[path] != shape:
                raise ShapeMismatchError(f"checkpoint {self.directory} step {step}: {path} has shape {have[path]}, "
                                         f"but the config gives {shape}")
        extra = sorted(set(have) - set(want))
        if extra:
            raise ShapeMismatchError(f"checkpoint {self.directory} step {step} has entries the config does not: {extra[:5]}")

    def step_folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read(self, step: int, **items):
        """manager.restore of `items` at `step`, after `verify`; a read that fails on the files
        raises DamagedCheckpointError naming the step's folder."""
        folder = self.step_folder(step)
        verify(folder)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except ShapeMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json errors on damaged files
            raise DamagedCheckpointError(f"checkpoint {folder} could not be read "
                                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e

    def restore(self, target, step: int | None = None):
        """(state, data_state, meta) at `step` (default latest); `target` is the state's abstract
        pytree (jax.ShapeDtypeStruct leaves with shardings) that the arrays are restored into."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        verify(self.step_folder(step))
        if _earlier_layout(self._saved_metadata(step)):
            return self._restore_earlier_layout(target, step)
        self.check_shapes(target, step)
        restored = self.read(step, state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
        return restored["state"], restored["data"] or None, restored["meta"] or {}

    def _restore_earlier_layout(self, target, step: int):
        """A checkpoint of an earlier layout (`MOVED`): read as saved, each array put where today's
        state keeps it, with the target's sharding. Every entry must find its place."""
        state, data, meta = self.restore_raw(step)
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        have = {_moved("/".join(_key_name(k) for k in path)): leaf for path, leaf in flat}
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        paths = ["/".join(_key_name(k) for k in path) for path, _ in leaves]
        missing, unused = [q for q in paths if q not in have], sorted(set(have) - set(paths))
        if missing or unused:
            raise ShapeMismatchError(f"checkpoint {self.directory} step {step} (an earlier layout) does not fit the "
                                     f"config: missing {missing[:5]}, not used {unused[:5]}")
        for q, (_, t) in zip(paths, leaves):
            shape = tuple(getattr(have[q], "shape", ()))
            if shape != tuple(t.shape):
                raise ShapeMismatchError(f"checkpoint {self.directory} step {step}: {q} has shape {shape}, but the "
                                         f"config gives {tuple(t.shape)}")
        arrays = [jax.device_put(_as_dtype(have[q], t.dtype), t.sharding) for q, (_, t) in zip(paths, leaves)]
        log.warning("checkpoint %s step %d: read from an earlier layout (%s)", self.directory, step,
                    ", ".join(f"{a} -> {b}" for a, b in MOVED.items()))
        return jax.tree_util.tree_unflatten(treedef, arrays), data, meta

    def _saved_metadata(self, step: int):
        try:
            return self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - a damaged step's metadata
            raise DamagedCheckpointError(f"checkpoint {self.step_folder(step)}: its metadata could not be read "
                                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e

    def restore_raw(self, step: int | None = None) -> tuple[dict, Any, dict]:
        """(state as saved: nested dicts of numpy arrays, data_state, meta), without a target
        (for tools and tests that read a checkpoint without building the models)."""
        step = self.latest_step() if step is None else step
        restored = self.read(step, state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
        return restored["state"], restored["data"] or None, restored["meta"] or {}

    def restore_meta(self, step: int | None = None) -> dict:
        """The metadata dict saved at `step` (default latest) alone: no arrays are read, so it
        works on any number of devices."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        return self.read(step, meta=ocp.args.JsonRestore())["meta"] or {}

    def close(self) -> None:
        self.manager.close()
