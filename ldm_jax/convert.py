"""Stable Diffusion weights in and out of training runs.

    python -m ldm_jax.convert --from_diffusers /models/sd15 --to_workdir runs/sd15_ft
    python -m ldm_jax.convert --workdir runs/base --to_diffusers exports/base [--checkpoint_step N] [--noema]

`--from_diffusers` turns a local diffusers-format Stable Diffusion folder into a workdir at step 0:
config.json (the UNet, autoencoder and text encoder shapes, the schedule and prediction of the
folder's scheduler, the VAE's latent scale), a diffusion checkpoint holding the UNet as a fresh
TrainState, and a config.py that loads that config. The autoencoder and the frozen text encoder
stay in the source folder (`diffusers:<folder>` sources), so keep it. Then

    LatentDiffusionPipeline.from_workdir("runs/sd15_ft")                  # sample it
    python -m ldm_jax.train --config runs/sd15_ft/config.py --workdir runs/sd15_ft \\
        --config.data.options.folder=/data/my_images --config.train.steps=2000   # fine-tune it

`--to_diffusers` writes a run's UNet (EMA weights by default), KL autoencoder (its config carrying
the run's latent scale), text encoder, tokenizer and a DDIM scheduler as a diffusers folder
(safetensors) that `diffusers.StableDiffusionPipeline.from_pretrained` loads.
"""
from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from ldm_jax.training.diffusers_runs import (config_for_diffusers, diffusers_to_workdir,  # noqa: F401 (the library)
                                             pipeline_components, workdir_to_diffusers)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by __main__ only, so that the library functions import
    alongside other CLIs' flags)."""
    flags.DEFINE_string("from_diffusers", None, "a local diffusers-format Stable Diffusion folder to import")
    flags.DEFINE_string("to_workdir", None, "the workdir to create from --from_diffusers")
    flags.DEFINE_string("workdir", None, "a training run to export")
    flags.DEFINE_string("to_diffusers", None, "the diffusers folder to write from --workdir")
    flags.DEFINE_integer("checkpoint_step", None, "the run's checkpoint step to export (default: the latest)")
    flags.DEFINE_bool("ema", True, "export the EMA parameters (--noema: the raw ones)")


def main(argv):
    if not FLAGS["verbosity"].present:  # orbax and jax log every step at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    importing = bool(FLAGS.from_diffusers or FLAGS.to_workdir)
    exporting = bool(FLAGS.workdir or FLAGS.to_diffusers)
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (every input is a flag)")
        if importing == exporting or (importing and not (FLAGS.from_diffusers and FLAGS.to_workdir)) or (
                exporting and not (FLAGS.workdir and FLAGS.to_diffusers)):
            raise ValueError("give --from_diffusers DIR --to_workdir DIR2, or --workdir DIR --to_diffusers DIR2")
        if importing:
            path = diffusers_to_workdir(FLAGS.from_diffusers, FLAGS.to_workdir)
            print(f"wrote workdir {path} (sample it with --workdir {path}; fine-tune it with "
                  f"python -m ldm_jax.train --config {path}/config.py --workdir {path})")
        else:
            path = workdir_to_diffusers(FLAGS.workdir, FLAGS.to_diffusers, FLAGS.checkpoint_step, FLAGS.ema)
            print(f"wrote diffusers folder {path}")
    except (FileNotFoundError, ValueError) as e:
        print(f"ldm_jax.convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
