"""Generation: text -> image, image -> image (SDEdit) and inpainting, from our runs or Stable Diffusion.

    pipe = LatentDiffusionPipeline.from_workdir("runs/base")           # our training run (EMA weights)
    pipe = LatentDiffusionPipeline.from_diffusers_dir("/models/sd15")  # a local diffusers folder
    images = pipe.text_to_image(["a red circle on the left"], num_steps=20, guidance_scale=4.0, seed=0)

Every call runs one jitted program: the condition encoder, the whole sampler loop
(`samplers.sample`: one `lax.scan`, classifier-free guidance as one batched UNet call per step),
and the decoder. Programs are cached per (batch, size, sampler, steps, task, strength, outputs);
prompts, seeds, guidance, eta, images and masks are traced arguments, so changing them reuses the
compiled program (`trace_count` counts traces). The batch is padded to a multiple of the device
count and split over the mesh's devices; parameters are replicated.

Image i of a call draws its noise from `PRNGKey(seed_i)` alone (seed_i = seed + i unless a list
is given), so an image can be regenerated on its own from its seed. A progress bar
(`progress=True`) ticks from inside the compiled loop through `jax.debug.callback`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ldm_jax.diffusion import gaussian, samplers, schedules, sd_schedulers
from ldm_jax.generation import OUTPUT_TYPES, RELAY as _RELAY, Program, images_in, is_inpainting_model, masks_in, \
    run_program  # noqa: F401 (_RELAY: the progress relay, read by tests)
from ldm_jax.ldm import LatentDiffusion, make_conditioning
from ldm_jax.ldm.sources import from_workdir as load_workdir_model
from ldm_jax.runtime import sharding, xla_options

# ldm_jax's own sampler closest to a diffusers scheduler class: what a run imported from a folder
# (training/diffusers_runs.py) samples its previews with. The pipeline itself runs the folder's
# scheduler exactly (sampler="scheduler"). LMS and Euler-ancestral have no counterpart here.
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "PNDMScheduler": "plms", "DDPMScheduler": "ddpm",
                      "DPMSolverMultistepScheduler": "dpm_solver++", "EulerDiscreteScheduler": "euler",
                      "HeunDiscreteScheduler": "heun", "UniPCMultistepScheduler": "unipc"}


class SamplerDefaults(NamedTuple):
    """What a call uses for the arguments it leaves out (a run's `sampler` config group)."""

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0


class LatentDiffusionPipeline:
    """A text- / class-conditional (or unconditional) latent diffusion model ready to sample.

    Build it with `from_workdir` or `from_diffusers_dir`; or directly from modules and
    `params = {"unet", "autoencoder", "scale", and "text_encoder" or "class_embedder"}`.
    `schedule` is `interop.diffusers.schedule_from_scheduler_config`'s dict (schedule, prediction,
    spacing, steps_offset). `info` describes the source (written to the CLI's sidecars).
    """

    def __init__(self, *, unet=None, autoencoder=None, params: dict, schedule: dict, conditioning: str = "text",
                 text_encoder=None, tokenizer=None, max_length: int | None = None, num_classes: int = 0,
                 variance: str = "fixed_small", defaults: SamplerDefaults = SamplerDefaults(), mesh=None,
                 info: dict | None = None, progress: bool = False, model: LatentDiffusion | None = None):
        if model is None:  # from modules: the model object they make
            blocks = getattr(autoencoder, "block_out_channels", None)
            f = 2 ** (len(blocks) - 1) if blocks else 1
            model = LatentDiffusion(
                unet=unet, autoencoder=autoencoder, schedule=None, image_size=int(unet.sample_size) * f,
                conditioning=make_conditioning(conditioning, context_dim=unet.cross_attention_dim,
                                               text_encoder=text_encoder, tokenizer=tokenizer, max_length=max_length,
                                               num_classes=num_classes),
                variance=variance)
        self.model = model
        self.defaults, self.info, self.progress = defaults, dict(info or {}), progress
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = jax.device_put(dict(params, scale=np.float32(params["scale"])), sharding.replicated(self.mesh))
        self.scale_factor = float(params["scale"])
        self.scheduler = None  # a diffusers scheduler (sd_schedulers.Scheduler), run by sampler="scheduler"
        self.mask_downsampling = "max"  # latent mask: repaint a cell if any of its pixels is ("nearest": diffusers')
        self._set_schedule(schedule)

    def _set_schedule(self, schedule: dict) -> None:
        self.schedule = dict(schedule)
        kwargs = {k: v for k, v in schedule.items() if k not in ("prediction", "spacing", "steps_offset")}
        noise_schedule = schedules.make_schedule(kwargs.pop("name"), kwargs.pop("num_timesteps"), **kwargs)
        self.model = dataclasses.replace(self.model, schedule=noise_schedule, prediction=schedule["prediction"])
        self.trace_count = 0  # traces of the generation program (tests assert it does not grow)
        self._jitted = jax.jit(self._run, static_argnames="program", compiler_options=xla_options.compiler_options())
        self._encode_jit = jax.jit(self.model.encode)
        self._decode_jit = jax.jit(self.model.decode_uint8)

    # ----------------------------------------------------------------------------- the model's parts

    unet = property(lambda self: self.model.unet)
    autoencoder = property(lambda self: self.model.autoencoder)
    text_encoder = property(lambda self: self.model.text_encoder)
    noise_schedule = property(lambda self: self.model.schedule)
    variance = property(lambda self: self.model.variance)
    conditioning = property(lambda self: self.model.conditioning.kind, doc="'text', 'class' or 'none'")
    tokenizer = property(lambda self: getattr(self.model.conditioning, "tokenizer", None))
    max_length = property(lambda self: getattr(self.model.conditioning, "max_length", None))
    num_classes = property(lambda self: getattr(self.model.conditioning, "num_classes", 0))

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, ema: bool = True, *, mesh=None,
                     progress: bool = False) -> "LatentDiffusionPipeline":
        """A training run's diffusion model at `step` (default: the latest checkpoint), with its EMA
        parameters (or the raw ones, `ema=False`), its autoencoder and its latent scale factor."""
        from ldm_jax.runs.workdir import workdir_schedule

        loaded = load_workdir_model(workdir, step, ema, mesh)
        s = loaded.config.sampler
        return cls(model=loaded.model, params=loaded.params, schedule=workdir_schedule(loaded.config),
                   defaults=SamplerDefaults(s.name, s.num_steps, s.guidance_scale, s.guidance_rescale, s.eta),
                   mesh=mesh, progress=progress, info=loaded.info)

    @classmethod
    def from_diffusers_dir(cls, path: str, *, variant: str | None = None, dtype=None, mesh=None,
                           progress: bool = False) -> "LatentDiffusionPipeline":
        """A local diffusers-format Stable Diffusion folder (SD 1.x / 2.x, eps or v prediction as its
        scheduler config says; a 9-channel inpainting UNet is used as such by `inpaint`).

        variant: read `*.{variant}.safetensors` weights (e.g. "fp16"; upcast to float32 params);
        by default the plain files, or the folder's only variant. `info` records the variant read
        and the model_index.json components not loaded (`interop.diffusers.load_diffusers_dir`)."""
        from ldm_jax.interop import diffusers as hf

        path = os.path.abspath(os.path.expanduser(path))
        c = hf.load_diffusers_dir(path, variant=variant, dtype=dtype)
        params = {"unet": c.unet_params, "text_encoder": c.text_encoder_params, "autoencoder": c.vae_params,
                  "scale": c.vae.scaling_factor}
        try:
            scheduler = sd_schedulers.Scheduler.from_config(c.scheduler_config)
        except ValueError as e:
            raise ValueError(f"{os.path.join(path, 'scheduler', 'scheduler_config.json')}: {e}") from None
        pipe = cls(unet=c.unet, autoencoder=c.vae, params=params, schedule=c.schedule, text_encoder=c.text_encoder,
                   tokenizer=c.tokenizer, defaults=SamplerDefaults(sampler="scheduler"), mesh=mesh, progress=progress,
                   info=dict(kind="diffusers", path=path, variant=c.variant, ignored=dict(c.ignored)))
        pipe.scheduler = scheduler
        pipe.mask_downsampling = "nearest"  # diffusers' prepare_mask_latents (interpolate, mode "nearest")
        return pipe

    def with_scheduler(self, scheduler_config, **overrides) -> "LatentDiffusionPipeline":
        """The same weights sampled by a diffusers scheduler, exactly as diffusers runs it: a config
        (a dict as in scheduler_config.json, naming its `_class_name`) or a diffusers scheduler
        object, with `overrides` as `from_config(config, **overrides)` takes them. The default
        sampler becomes "scheduler" (`sd_schedulers`); the schedule (betas, prediction) follows
        the config. Unknown classes and unsupported keys are errors naming them."""
        from ldm_jax.interop import diffusers as hf

        self._check_discrete("with_scheduler")
        if hasattr(scheduler_config, "config"):  # a scheduler object: its config, and its class
            scheduler_config = {**scheduler_config.config, "_class_name": type(scheduler_config).__name__}
        config = {**dict(scheduler_config), **overrides}
        scheduler = sd_schedulers.Scheduler.from_config(config)
        other = copy.copy(self)
        other.defaults = self.defaults._replace(sampler="scheduler")
        other._set_schedule(hf.schedule_from_scheduler_config(scheduler.schedule_config()))
        other.scheduler = scheduler
        return other

    def with_spacing(self, spacing: str) -> "LatentDiffusionPipeline":
        """The same weights and schedule, visiting the sampler's timesteps with another spacing
        ("leading", "trailing" or "linspace": `samplers.timesteps`; Lin et al. 2024, Table 2)."""
        self._check_discrete("with_spacing")
        gaussian.check_choice("spacing", spacing, samplers.SPACINGS)
        other = copy.copy(self)
        other._set_schedule({**self.schedule, "spacing": spacing})
        return other

    def with_lora(self, lora, scale: float = 1.0) -> "LatentDiffusionPipeline":
        """The same model with a LoRA merged into its weights (W + scale * (alpha / r) A B in each adapted
        layer; exact, so sampling costs what it did): `lora` is a LoRA file -- diffusers / peft
        (`pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it) or kohya -- or a folder
        holding pytorch_lora_weights.safetensors, or adapters {"unet": ..., "text_encoder": ...}
        (`models.lora`, alpha / r already in B). Applying several LoRAs adds them up."""
        from ldm_jax.interop import lora_weights
        from ldm_jax.models import lora as lora_lib

        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        host = {k: jax.device_get(self.params[k]) for k in lora_lib.NETWORKS if k in self.params}
        if isinstance(lora, dict):
            adapters, source = lora, "adapters"
        else:
            adapters, source = lora_weights.load_lora_weights(lora, host), str(lora_weights.lora_file(lora))
        params = dict(self.params)
        for network, tree in adapters.items():
            if network not in host:
                raise ValueError(f"the LoRA adapts the {network.replace('_', ' ')}, which this model does not have")
            params[network] = lora_lib.merge(host[network], tree, float(scale))
        other = copy.copy(self)
        other.params = jax.device_put(params, sharding.replicated(self.mesh))
        other.info = {**self.info, "lora": [*self.info.get("lora", []), {"path": source, "scale": float(scale)}]}
        return other

    def _check_discrete(self, what: str) -> None:
        if self.model.process is not None:
            raise ValueError(f"{what} sets a discrete-time schedule; this model's process is "
                             f"{self.model.process.name!r}, whose samplers visit its own time grid "
                             "(choose the sampler and the number of steps instead)")

    # ----------------------------------------------------------------------------- sizes

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel (1 for pixel-space models)."""
        return self.model.codec.downsampling_factor

    @property
    def clip_x0(self) -> float | None:
        """The bound the samplers clip predicted x_0 to (pixel-space models: 1), or None."""
        return self.model.codec.clip_x0

    @property
    def autoencoder_is_identity(self) -> bool:
        return self.model.codec.is_identity

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: the autoencoder's factor times the UNet's."""
        return self.downsampling_factor * 2 ** (len(self.unet.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.model.codec.latent_channels

    @property
    def is_inpainting_model(self) -> bool:
        """A UNet that takes [latents, mask, masked-image latents] (SD inpainting, 9 channels)."""
        return is_inpainting_model(self.model)

    @property
    def default_size(self) -> int:
        return int(self.unet.sample_size) * self.downsampling_factor

    # ----------------------------------------------------------------------------- public API

    def text_to_image(self, prompts, negative_prompts=None, num_steps: int | None = None,
                      guidance_scale: float | None = None, guidance_rescale: float | None = None,
                      sampler: str | None = None, eta: float | None = None, seed=0, height: int | None = None,
                      width: int | None = None, latents=None, return_intermediates: bool | int = False,
                      output_type: str = "uint8"):
        """Images for `prompts` (strings; class labels (ints) for a class-conditional model; for an
        unconditional model, anything whose length is the batch): uint8 [B, H, W, 3].

        negative_prompts: the "unconditional" side of classifier-free guidance (default "").
        seed: an int (image i uses seed + i) or one seed per image. latents: x_T [B, h, w, c]
        instead of drawing it. output_type: "uint8", "float" ([0, 1], as diffusers' "np") or
        "latent" (the final latents). return_intermediates: True or k > 0 also returns
        {"x_t", "pred_x0": uint8 [n, B, H, W, 3], "t": [n]}, decoded every k steps (True: ~8 frames).
        """
        return self._generate("text", prompts, negative_prompts=negative_prompts, num_steps=num_steps,
                              guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler,
                              eta=eta, seed=seed, height=height, width=width, latents=latents,
                              return_intermediates=return_intermediates, output_type=output_type)

    def image_to_image(self, images, prompts, strength: float = 0.8, **kwargs):
        """SDEdit (Meng et al. 2022): encode `images` (uint8 [B, H, W, 3]), noise the latents to the
        step `strength` of the way up the sampler's plan, and denoise from there with `prompts`
        (diffusers' img2img: int(num_steps * strength) steps run). strength 0 returns the
        autoencoder's reconstruction. Other arguments as `text_to_image`."""
        return self._generate("image", prompts, images=images, strength=strength, **kwargs)

    def inpaint(self, images, masks, prompts, strength: float = 1.0, **kwargs):
        """Repaint where `masks` ([B, H, W] or [B, H, W, 1]; > 0.5, or > 127 for uint8, = repaint)
        is set, keeping the rest of `images`. A standard model blends the known latents (noised to
        the current level) back in after every step; a latent cell is repainted when any of its
        pixels is (max-pooled mask), so the final latents equal the input's outside the mask. A
        9-channel inpainting UNet gets [latents, mask, masked-image latents] instead."""
        return self._generate("inpaint", prompts, images=images, masks=masks, strength=strength, **kwargs)

    def encode(self, images) -> np.ndarray:
        """uint8 images [B, H, W, 3] -> scaled latents (the posterior's mode times the scale factor)."""
        x = images_in(images)
        return np.asarray(self._encode_jit(self.params, jnp.asarray(x)))

    def decode(self, latents) -> np.ndarray:
        """Scaled latents [B, h, w, c] -> uint8 images [B, H, W, 3]."""
        return np.asarray(self._decode_jit(self.params, jnp.asarray(latents, jnp.float32)))

    # ----------------------------------------------------------------------------- host side

    def _conditions(self, prompts, negative_prompts):
        """(cond, uncond) as arrays: token ids [B, L] or labels [B]."""
        return self.model.conditioning.conditions(prompts, negative_prompts)

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless height x width can be sampled (multiples of `size_multiple`)."""
        m = self.size_multiple
        if height < 1 or width < 1 or height % m or width % m:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {m} (the autoencoder's "
                             f"downsampling factor {self.downsampling_factor} x the UNet's "
                             f"{m // self.downsampling_factor})")

    def _generate(self, task, prompts, *, negative_prompts=None, num_steps=None, guidance_scale=None,
                  guidance_rescale=None, sampler=None, eta=None, seed=0, height=None, width=None, latents=None,
                  return_intermediates=False, output_type="uint8", images=None, masks=None, strength=1.0):
        d = self.defaults
        sampler = d.sampler if sampler is None else sampler
        num_steps = d.num_steps if num_steps is None else num_steps
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        guidance_rescale = d.guidance_rescale if guidance_rescale is None else guidance_rescale
        eta = d.eta if eta is None else eta
        if sampler == "scheduler":
            if self.scheduler is None:
                raise ValueError("sampler 'scheduler' runs a diffusers scheduler: load a diffusers folder or call "
                                 f"with_scheduler(config) first; or name one of {', '.join(samplers.SAMPLERS)}")
        elif sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(samplers.SAMPLERS)}, scheduler "
                             "(a diffusers folder's own scheduler)")
        T = self.model.schedule.num_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}], got {num_steps!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {guidance_scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        cond, uncond = self._conditions(prompts, negative_prompts)
        batch = len(cond)

        inputs: dict[str, Any] = {}
        start_step = 0
        if task != "text":
            x = images_in(images)
            if len(x) == 1 and batch > 1:
                x = np.repeat(x, batch, axis=0)
            if len(x) != batch:
                raise ValueError(f"{len(x)} images for {batch} prompts")
            height, width = x.shape[1:3]
            self.check_size(height, width)
            inputs["images"] = x
            if task == "inpaint":
                inputs["masks"] = masks_in(masks, x)
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
            start_step = num_steps - min(int(num_steps * strength), num_steps)
        else:
            height = self.default_size if height is None else int(height)
            width = self.default_size if width is None else int(width)
            self.check_size(height, width)
        f = self.downsampling_factor
        latent_shape = (batch, height // f, width // f, self.latent_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != latent_shape:
                raise ValueError(f"latents have shape {latents.shape}, expected {latent_shape}")
            inputs["latents"] = latents

        seeds = np.asarray([seed + i for i in range(batch)] if np.ndim(seed) == 0 else seed, np.int64)
        if seeds.shape != (batch,):
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
        visited = num_steps - start_step
        record = 0
        if return_intermediates and visited:
            record = max(1, math.ceil(visited / 8)) if return_intermediates is True else int(return_intermediates)

        # Pad the batch to a multiple of the device count (repeating the last example).
        n_dev = self.mesh.devices.size
        padded = -(-batch // n_dev) * n_dev
        keys = np.stack([np.asarray(jax.random.PRNGKey(int(s))) for s in seeds])
        inputs.update(cond=cond, uncond=uncond, keys=keys)
        if padded != batch:
            inputs = {k: np.concatenate([v, np.repeat(v[-1:], padded - batch, axis=0)]) for k, v in inputs.items()}
        batch_sharding = sharding.batch_sharding(self.mesh)
        arrays = {k: jax.device_put(v, batch_sharding) for k, v in inputs.items()}
        arrays.update(jax.device_put({"guidance": np.float32(guidance_scale), "rescale": np.float32(guidance_rescale),
                                      "eta": np.float32(eta)}, sharding.replicated(self.mesh)))
        program = Program(task, padded, latent_shape[1:3], self.scheduler if sampler == "scheduler" else sampler,
                          int(num_steps), int(start_step), int(record), output_type, bool(self.progress and visited),
                          spacing=self.schedule["spacing"], steps_offset=int(self.schedule["steps_offset"]),
                          mask_downsampling=self.mask_downsampling)
        _RELAY.done = 0
        if program.progress:
            _RELAY.bar = tqdm.tqdm(total=visited, desc=f"{sampler} {visited} steps", leave=False, dynamic_ncols=True)
        try:
            out, inter = self._jitted(self.params, arrays, program=program)
            self.last_output_sharding = out.sharding
            out = np.asarray(out)[:batch]  # waits for the device (and the last progress ticks)
            jax.effects_barrier()
        finally:
            if _RELAY.bar is not None:
                _RELAY.bar.close()
                _RELAY.bar = None
        if not return_intermediates:
            return out
        if not record:
            return out, {}
        return out, {"x_t": np.asarray(inter["x_t"])[:, :batch], "pred_x0": np.asarray(inter["pred_x0"])[:, :batch],
                     "t": np.asarray(inter["t"])}

    # ----------------------------------------------------------------------------- compiled side

    def _context(self, params, cond):
        return self.model.context(params, cond)

    def _run(self, params, inputs, *, program: Program):
        """The compiled program (`generation.run_program`)."""
        self.trace_count += 1
        return run_program(self.model, params, inputs, program=program, mesh=self.mesh)
