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

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

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


# Module fields that a config must not set (another key decides them), per config group.
_NOT_IN_CONFIG = {
    "unet": ("in_channels", "out_channels", "sample_size", "dtype", "param_dtype", "remat", "num_class_embeds"),
    "vae": ("dtype", "param_dtype", "scaling_factor", "sample_size"),
    "text": ("dtype", "param_dtype"),
}

_CONFIG_PY = '''"""Written by python -m ldm_jax.convert: this workdir's own config (config.json next to it).

    python -m ldm_jax.train --config {workdir}/config.py --workdir {workdir} \\\\
        --config.data.options.folder=/data/my_images --config.train.steps=2000
"""
import pathlib

from ldm_jax.workdir import load_workdir_config


def get_config():
    return load_workdir_config(pathlib.Path(__file__).resolve().parent)
'''


def _kwargs(module, drop) -> dict:
    from ldm_jax.interop.diffusers import module_kwargs

    out = {k: v for k, v in module_kwargs(module).items() if k not in drop}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_for_diffusers(components, source: str):
    """A training config (base.py's keys) for the models of a loaded diffusers folder."""
    from ldm_jax.pipeline import SCHEDULER_SAMPLERS
    from ldm_jax.training import config as config_lib

    c = components
    factor = 2 ** (len(c.vae.block_out_channels) - 1)
    schedule = dict(c.schedule)
    config = config_lib.reference_config().copy_and_resolve_references()
    config.stages = ("ldm",)
    config.data.update(name="image_folder", image_size=int(c.unet.sample_size) * factor,
                       options={"folder": "~/data/images"})  # placeholder: --config.data.options.folder
    config.autoencoder.update(kind="kl", source=f"diffusers:{source}", scale_factor=float(c.vae.scaling_factor))
    config.autoencoder.model = _kwargs(c.vae, _NOT_IN_CONFIG["vae"])
    max_length = int(min(c.tokenizer.model_max_length, c.text_encoder.max_position_embeddings))
    config.text_encoder.update(source=f"diffusers:{source}", train=False, max_length=max_length)
    config.text_encoder.model = _kwargs(c.text_encoder, _NOT_IN_CONFIG["text"])
    config.unet = _kwargs(c.unet, _NOT_IN_CONFIG["unet"])
    config.conditioning.update(kind="text", caption_dropout=0.1)
    config.diffusion.update(
        schedule=schedule.pop("name"), num_timesteps=int(schedule.pop("num_timesteps")),
        zero_terminal_snr=bool(schedule.pop("zero_terminal_snr")), prediction=schedule.pop("prediction"),
        variance="fixed_small", objective="simple", weighting="none", timestep_sampler="uniform")
    spacing = schedule.pop("spacing")
    schedule.pop("steps_offset")  # the config has no key for it: workdirs sample with offset 0
    config.diffusion.schedule_kwargs = schedule  # beta_start / beta_end / rescale when not the defaults
    sampler = SCHEDULER_SAMPLERS.get((c.scheduler_config or {}).get("_class_name"), "ddim")
    config.sampler.update(name=sampler, num_steps=50, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
                          spacing=spacing)
    config.optim.update(lr=1e-5, warmup_steps=0, ema_decay=0.9999)
    config.train.update(steps=1000, checkpoint_every=500, sample_every=500)
    return config


def diffusers_to_workdir(source: str, workdir: str) -> str:
    """Import a diffusers Stable Diffusion folder as a workdir at step 0 (see the module docstring)."""
    import jax
    import numpy as np

    from ldm_jax.interop import diffusers as hf
    from ldm_jax.training import config as config_lib
    from ldm_jax.training import autoencoder_stage, ldm_stage, run_record
    from ldm_jax.training.checkpoint import StageCheckpoints
    from ldm_jax.training.state import TrainState

    source = os.path.abspath(os.path.expanduser(source))
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} already holds checkpoints; import into a new workdir")
    if os.path.exists(os.path.join(workdir, "config.json")):
        raise ValueError(f"{workdir} already holds a run's config.json; import into a new workdir")
    c = hf.load_diffusers_dir(source)
    if c.unet.in_channels != c.vae.latent_channels:
        raise ValueError(f"{source}: its UNet takes {c.unet.in_channels} channels, its VAE's latents have "
                         f"{c.vae.latent_channels} (an inpainting UNet?); only text-to-image models import as "
                         "workdirs (use LatentDiffusionPipeline.from_diffusers_dir to sample it)")
    if c.unet.num_class_embeds is not None:
        raise ValueError(f"{source}: UNets with class embeddings are not supported as workdirs")
    config = config_for_diffusers(c, source)
    config_lib.validate(config)
    models = ldm_stage.build_models(config)

    # The state the training loop restores: ldm_stage.init_state's, with the imported UNet.
    k_run = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    extra = {"timesteps": ldm_stage.make_timestep_sampler(config).init()}
    state = TrainState.create({"unet": c.unet_params}, ldm_stage.make_optimizer(config), k_run, extra=extra,
                             flat=autoencoder_stage.flat_update(config))
    expected = jax.eval_shape(lambda rng: ldm_stage.init_state(config, models, rng), jax.random.PRNGKey(0))
    if jax.tree.structure(expected) != jax.tree.structure(state) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected))):
        raise ValueError(f"{source}: the imported UNet does not fit the config written for it")

    os.makedirs(workdir, exist_ok=True)
    run_record.write_config(workdir, config)  # versioned, as the training loop stores it
    with open(os.path.join(workdir, "config.py"), "w", encoding="utf-8") as f:
        f.write(_CONFIG_PY.format(workdir=workdir))
    ckpt = StageCheckpoints(workdir, "ldm")
    ckpt.save(0, state, meta={"scale_factor": float(c.vae.scaling_factor), "imported_from": source})
    ckpt.close()
    return workdir


def pipeline_components(pipe):
    """The pipeline's models as `interop.diffusers.DiffusersComponents` (for `export_diffusers_dir`):
    needs a text-conditional model with a KL autoencoder; the exported VAE carries the latent scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.interop import diffusers as hf
    from ldm_jax.models.autoencoder import AutoencoderKL

    if pipe.conditioning != "text":
        raise ValueError(f"only text-conditional models export to diffusers; this one is {pipe.conditioning!r}")
    if not isinstance(pipe.autoencoder, AutoencoderKL):
        raise ValueError(f"only KL autoencoders export to diffusers; this one is a {type(pipe.autoencoder).__name__}")
    if pipe.variance == "learned_range":
        raise ValueError("a learned-variance UNet (variance='learned_range') has no diffusers scheduler equivalent")
    host = jax.tree.map(np.asarray, pipe.params)
    return hf.DiffusersComponents(
        unet=pipe.unet.clone(dtype=jnp.float32), unet_params=host["unet"],
        vae=pipe.autoencoder.clone(scaling_factor=pipe.scale_factor, dtype=jnp.float32), vae_params=host["autoencoder"],
        text_encoder=pipe.text_encoder.clone(dtype=jnp.float32), text_encoder_params=host["text_encoder"],
        tokenizer=pipe.tokenizer, schedule=pipe.schedule)


def workdir_to_diffusers(workdir: str, out: str, step: int | None = None, ema: bool = True) -> str:
    """Export a run as a diffusers folder (see the module docstring); returns its path. `out`
    must be new or empty: an export never writes over other files."""
    from ldm_jax.interop import diffusers as hf
    from ldm_jax.pipeline import LatentDiffusionPipeline

    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ValueError(f"--to_diffusers {out} already exists and is not an empty folder; export into a new folder")
    pipe = LatentDiffusionPipeline.from_workdir(workdir, step=step, ema=ema)
    return str(hf.export_diffusers_dir(out, pipeline_components(pipe)))


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
