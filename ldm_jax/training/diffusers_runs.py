"""A diffusers Stable Diffusion folder as a training run (a workdir that samples like the folder and
fine-tunes with the train command), and a run back as a diffusers folder: the convert command's
library."""
from __future__ import annotations

import os
import warnings

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

from ldm_jax.runs.workdir import load_workdir_config


def get_config():
    return load_workdir_config(pathlib.Path(__file__).resolve().parent)
'''


def _kwargs(module, drop) -> dict:
    from ldm_jax.interop.diffusers import module_kwargs

    out = {k: v for k, v in module_kwargs(module).items() if k not in drop}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_for_diffusers(components, source: str):
    """A training config (base.py's keys) for the models of a loaded diffusers folder."""
    from ldm_jax import config as config_lib
    from ldm_jax.diffusion import sd_schedulers
    from ldm_jax.pipeline import SCHEDULER_SAMPLERS

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
        process="discrete", process_kwargs={}, timestep_kwargs={}, preconditioning="none",  # not base.py's flow
        schedule=schedule.pop("name"), num_timesteps=int(schedule.pop("num_timesteps")),
        zero_terminal_snr=bool(schedule.pop("zero_terminal_snr")), prediction=schedule.pop("prediction"),
        variance="fixed_small", objective="simple", weighting="none", timestep_sampler="uniform")
    spacing = schedule.pop("spacing")
    schedule.pop("steps_offset")  # the config has no key for it: workdirs sample with offset 0
    config.diffusion.schedule_kwargs = schedule  # beta_start / beta_end / rescale when not the defaults
    scheduler_class = (c.scheduler_config or {}).get("_class_name")
    if scheduler_class not in SCHEDULER_SAMPLERS:
        sd_schedulers.Scheduler.from_config(c.scheduler_config or {})  # an unknown class: the error names the known
        warnings.warn(f"{scheduler_class} has no ldm_jax sampler of its own: the imported run's previews use "
                      "dpm_solver++ (config sampler.name); LatentDiffusionPipeline.from_diffusers_dir runs "
                      f"{scheduler_class} exactly", stacklevel=2)
    sampler = SCHEDULER_SAMPLERS.get(scheduler_class, "dpm_solver++")
    config.sampler.update(name=sampler, num_steps=50, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
                          spacing=spacing)
    config.optim.update(lr=1e-5, warmup_steps=0, ema_decay=0.9999)
    config.train.update(steps=1000, checkpoint_every=500, sample_every=500)
    return config


def diffusers_to_workdir(source: str, workdir: str) -> str:
    """Import a diffusers Stable Diffusion folder as a workdir at step 0 (see the module docstring)."""
    import jax
    import numpy as np

    from ldm_jax import config as config_lib
    from ldm_jax.interop import diffusers as hf
    from ldm_jax.runs import run_record
    from ldm_jax.runs.checkpoint import StageCheckpoints
    from ldm_jax.training import autoencoder_stage, ldm_stage
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
    state = TrainState.create({"unet": c.unet_params}, ldm_stage.optimizer_from_config(config), k_run, extra=extra,
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
    scheduler_config = scheduler_config_for(pipe.model)
    host = jax.tree.map(np.asarray, pipe.params)
    return hf.DiffusersComponents(scheduler_config=scheduler_config,
        unet=pipe.unet.clone(dtype=jnp.float32), unet_params=host["unet"],
        vae=pipe.autoencoder.clone(scaling_factor=pipe.scale_factor, dtype=jnp.float32), vae_params=host["autoencoder"],
        text_encoder=pipe.text_encoder.clone(dtype=jnp.float32), text_encoder_params=host["text_encoder"],
        tokenizer=pipe.tokenizer, schedule=pipe.schedule)


def scheduler_config_for(model) -> dict | None:
    """The diffusers scheduler config of a continuous-process model (None: the discrete schedule's
    DDIM config): flow -> FlowMatchEulerDiscreteScheduler (its timestep is 1000 t, ours too),
    EDM with EDM's preconditioning -> EDMEulerScheduler (its c_in, c_skip, c_out and c_noise =
    ln(sigma)/4 are ours). Other processes have no diffusers scheduler: an error says so."""
    from ldm_jax.interop.diffusers import DIFFUSERS_VERSION

    proc = model.process
    if proc is None or not proc.continuous:
        return None
    if proc.name == "flow" and model.prediction == "velocity":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": 1000, "shift": float(proc.shift), "use_dynamic_shifting": False}
    if proc.name == "edm" and model.preconditioning == "edm":
        return {"_class_name": "EDMEulerScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                "sigma_min": float(proc.sigma_min), "sigma_max": float(proc.sigma_max),
                "sigma_data": float(proc.sigma_data), "rho": float(proc.rho), "sigma_schedule": "karras",
                "num_train_timesteps": 1000, "prediction_type": "epsilon", "final_sigmas_type": "zero"}
    raise ValueError(f"a {proc.name!r} process with prediction {model.prediction!r} and preconditioning "
                     f"{model.preconditioning!r} has no diffusers scheduler: diffusers runs flow with velocity "
                     "prediction (FlowMatchEulerDiscreteScheduler) and EDM with EDM's preconditioning "
                     "(EDMEulerScheduler)")


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
