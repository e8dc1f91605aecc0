"""Reading a training run's workdir: its stored config (versioned; see runs/run_record.py) and its
checkpoints on any device count. Used by the model loader (`ldm.sources`), the commands and
evaluation."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from ldm_jax.runtime import sharding


def _tuples(tree):
    """JSON lists back to the tuples the configs use (linen module fields must be hashable)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run stored in `<workdir>/config.json`, brought to today's version by
    the explicit migrations of `runs.run_record` (an older run is read as it was trained,
    never under today's defaults), with the changes made on resume (`config_history.jsonl`)."""
    from ldm_jax.runs import run_record

    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not os.path.isfile(os.path.join(workdir, run_record.CONFIG_FILE)):
        raise FileNotFoundError(f"workdir {workdir} has no config.json: not a training run "
                                "(python -m ldm_jax.train writes it)")
    return ml_collections.ConfigDict(_tuples(run_record.load(workdir)))


def checkpoint_steps(workdir: str, stage: str) -> list[int]:
    """The steps saved for `stage` under `<workdir>/checkpoints/<stage>` (without creating it)."""
    folder = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints", stage)
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def restore_stage(workdir: str, stage: str, mesh, step: int | None = None) -> tuple[dict, dict]:
    """(state as nested dicts {"params", "ema_params", "step", ...}, meta) of `stage`'s checkpoint
    at `step` (default latest), every array replicated onto `mesh`. The target is the checkpoint's
    own tree, so this works on any device count and whatever the optimiser state looks like."""
    import orbax.checkpoint as ocp

    from ldm_jax.runs.checkpoint import DamagedCheckpointError, StageCheckpoints, verify

    steps = checkpoint_steps(workdir, stage)
    if not steps:
        raise FileNotFoundError(f"workdir {workdir} has no {stage} checkpoint "
                                f"(checkpoints/{stage} is missing or empty): train it first")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"workdir {workdir} has no {stage} checkpoint at step {step}; saved steps: {steps}")
    step = steps[-1] if step is None else step
    replicated = sharding.replicated(mesh)
    ckpt = StageCheckpoints(workdir, stage)
    try:
        folder = ckpt.step_folder(step)
        try:
            verify(folder)
            saved = ckpt.manager.item_metadata(step)["state"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved)
        except DamagedCheckpointError as e:
            raise DamagedCheckpointError(f"{e}; saved {stage} steps: {steps} (give another step)") from None
        except Exception as e:  # noqa: BLE001 - a damaged step's metadata
            raise DamagedCheckpointError(f"checkpoint {folder} could not be read ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:300]}); saved {stage} steps: {steps} "
                                         "(give another step)") from None
        restored = ckpt.read(step, state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    finally:
        ckpt.close()
    return restored["state"], restored["meta"] or {}


def check_param_shapes(params, expected, where: str) -> None:
    """Raise ValueError naming the first parameter of `expected` (a shape tree) that `params`
    lacks or holds with another shape."""
    import flax.traverse_util

    have = {"/".join(k): np.shape(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
    for key, leaf in flax.traverse_util.flatten_dict(expected).items():
        name = "/".join(key)
        if name not in have:
            raise ValueError(f"{where} has no parameter {name} (shape {tuple(leaf.shape)}); "
                             "was it written by another config?")
        if have[name] != tuple(leaf.shape):
            raise ValueError(f"{where}: parameter {name} has shape {have[name]}, the config gives {tuple(leaf.shape)}")


def workdir_schedule(config) -> dict:
    """A run's schedule and sampler spacing in `interop.diffusers.schedule_from_scheduler_config`'s format."""
    d = config.diffusion
    return dict(name=d.schedule, num_timesteps=int(d.num_timesteps), zero_terminal_snr=bool(d.zero_terminal_snr),
                **dict(d.get("schedule_kwargs", {})), prediction=d.prediction, spacing=config.sampler.spacing,
                steps_offset=0)
