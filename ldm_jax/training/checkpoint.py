"""Checkpoints of one training stage: orbax CheckpointManager under <workdir>/checkpoints/<stage>.

Each step saved holds the TrainState (params, EMA params, optimiser state, step, rng, ...), the
input pipeline's iterator state (so a resumed run sees exactly the batches it would have seen) and
JSON metadata (the config, the latent scale, ...). Restoring checks every parameter's shape against
the target first and names the first one that differs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class ShapeMismatchError(ValueError):
    pass


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


class StageCheckpoints:
    """Save / restore one stage's state, data iterator state and metadata."""

    def __init__(self, workdir: str, stage: str, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints", stage)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Any = None, meta: dict | None = None) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta or {}),
        ), force=True)
        self.manager.wait_until_finished()

    def check_shapes(self, target, step: int) -> None:
        """Raise ShapeMismatchError naming the first parameter whose saved shape differs from `target`."""
        saved = self.manager.item_metadata(step)["state"]
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

    def restore(self, target, step: int | None = None):
        """(state, data_state, meta) at `step` (default latest); `target` is the state's abstract
        pytree (jax.ShapeDtypeStruct leaves with shardings) that the arrays are restored into."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        self.check_shapes(target, step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"] or None, restored["meta"] or {}

    def restore_raw(self, step: int | None = None) -> tuple[dict, Any, dict]:
        """(state as saved: nested dicts of numpy arrays, data_state, meta), without a target
        (for tools and tests that read a checkpoint without building the models)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"] or None, restored["meta"] or {}

    def restore_meta(self, step: int | None = None) -> dict:
        """The metadata dict saved at `step` (default latest) alone: no arrays are read, so it
        works on any number of devices."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"] or {}

    def close(self) -> None:
        self.manager.close()
