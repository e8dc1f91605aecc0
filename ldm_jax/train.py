"""python -m ldm_jax.train --config configs/base.py --workdir runs/base [--config.optim.lr=1e-4 ...]

Trains the configured stages (autoencoder, then latent diffusion) in --workdir; rerunning with the
same workdir resumes (only keys that cannot change what was trained may differ from the stored
config; see ldm_jax/runs/run_record.py). Multi-host: run the same command on every host
(jax.distributed is initialised from the cluster environment, or from
--coordinator/--num_processes/--process_id).

A mistake (a missing config file, an unknown key, a value not allowed, a resume with another
config, a workdir another process is training in, a damaged checkpoint) prints one `error:` line
and exits with status 1, before anything in the workdir is changed.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "a configs/*.py file (override its values with --config.<key>=<value>)")
flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, samples); reused to resume")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")

_OVERRIDES: list[str] = []  # "dotted.key=value" from --config.dotted.key=value, in order


class UsageError(ValueError):
    pass


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the --config.<key> flags, their "key=value" overrides). Both
    `--config.a.b=v` and `--config.a.b v` are accepted."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value (--config.{key}=<value>)")
                value, i = argv[i + 1], i + 1
            overrides.append(f"{key}={value}")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser: our own --config.<key> overrides, absl's flags for the rest; any
    mistake is one `error:` line and exit status 1."""
    try:
        rest, overrides = split_overrides(argv)
        remaining = FLAGS(rest)
        if len(remaining) > 1:
            raise UsageError(f"unexpected arguments: {' '.join(remaining[1:])}")
        for name in ("config", "workdir"):
            if not FLAGS[name].value:
                raise UsageError(f"--{name} is required")
    except (flags.Error, UsageError) as e:
        _fail(e)
    _OVERRIDES[:] = overrides
    return remaining


def _fail(e: BaseException) -> None:
    print(f"ldm_jax.train: error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    del argv
    import jax

    from ldm_jax import config as config_lib
    from ldm_jax.runs.checkpoint import CheckpointSaveError
    from ldm_jax.runs.run_record import WorkdirInUseError
    from ldm_jax.training.loop import NonFiniteError, train_and_evaluate

    try:
        config = config_lib.load_config(FLAGS.config, _OVERRIDES)
        config_lib.validate(config)  # before the devices start
    except (ValueError, SyntaxError, OSError) as e:
        _fail(e)
    if FLAGS.coordinator:
        if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts talk over gloo
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    logging.getLogger("ldm_jax").setLevel(logging.INFO)
    logging.getLogger("ldm_jax").info("%d devices over %d processes (this is process %d)",
                                      jax.device_count(), jax.process_count(), jax.process_index())
    try:
        summary = train_and_evaluate(config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, WorkdirInUseError, CheckpointSaveError, NonFiniteError) as e:
        _fail(e)
    logging.getLogger("ldm_jax").info("finished: %s", summary)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
