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
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.tree_util import Partial

from ldm_jax.diffusion import gaussian, samplers, schedules
from ldm_jax.models.text_encoder import make_tokenizer, tokenize
from ldm_jax.training import sharding
from ldm_jax.training.xla_options import compiler_options
from ldm_jax.workdir import (autoencoder_params as _workdir_autoencoder_params, check_param_shapes,
                             checkpoint_steps, load_workdir_config, restore_stage, workdir_schedule)

# The sampler named by a diffusers scheduler class: the default for folders that ship it.
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "PNDMScheduler": "plms", "DDPMScheduler": "ddpm",
                      "DPMSolverMultistepScheduler": "dpm_solver++", "EulerDiscreteScheduler": "euler",
                      "HeunDiscreteScheduler": "heun"}
OUTPUT_TYPES = ("uint8", "float", "latent")


class SamplerDefaults(NamedTuple):
    """What a call uses for the arguments it leaves out (a run's `sampler` config group)."""

    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0


class _Program(NamedTuple):
    """Everything static about one compiled generation program."""

    task: str  # "text" | "image" | "inpaint"
    batch: int  # padded to the device count
    latent_hw: tuple
    sampler: str
    num_steps: int
    start_step: int  # SDEdit: steps skipped (num_steps: nothing left to denoise)
    record_every: int  # intermediates every k steps (0: none)
    output_type: str
    progress: bool


# ---------------------------------------------------------------------------------------------
# Progress: the compiled loop calls _tick every few steps; the relay forwards to the open bar.

PROGRESS_TICKS = 20  # host callbacks per sampling run, at most (each costs ~1-2 ms on a CPU host)


class _ProgressRelay:
    bar = None  # the open tqdm bar, if any
    done = 0  # steps of the current run reported so far
    ticks = 0  # steps reported over all runs (tests read it)


_RELAY = _ProgressRelay()


def _tick(done):
    delta = int(done) - _RELAY.done
    if delta > 0:
        _RELAY.done, _RELAY.ticks = int(done), _RELAY.ticks + delta
        if _RELAY.bar is not None:
            _RELAY.bar.update(delta)


def _blend(blend, x, i, abar_next):
    """Per-step hook of inpainting: the known region put back at x's noise level (diffusers'
    4-channel inpainting); exactly the known latents after the last step (abar_next = 1)."""
    del i
    if blend is None:
        return x
    known = jnp.sqrt(abar_next) * blend["z0"] + jnp.sqrt(1.0 - abar_next) * blend["noise"]
    return blend["keep"] * known + (1.0 - blend["keep"]) * x


def _blend_and_tick(blend, progress, x, i, abar_next):
    """`_blend`, and every `progress["every"]` steps (and at the last) a host callback that moves
    the progress bar: part of the compiled loop, a `lax.cond` away from costing every step."""
    done = i - progress["start"] + 1
    report = (done % progress["every"] == 0) | (i == progress["last"])
    jax.lax.cond(report, lambda d: jax.debug.callback(_tick, d), lambda d: None, done)
    return _blend(blend, x, i, abar_next)


# ---------------------------------------------------------------------------------------------
# The pipeline


class LatentDiffusionPipeline:
    """A text- / class-conditional (or unconditional) latent diffusion model ready to sample.

    Build it with `from_workdir` or `from_diffusers_dir`; or directly from modules and
    `params = {"unet", "autoencoder", "scale", and "text_encoder" or "class_embedder"}`.
    `schedule` is `interop.diffusers.schedule_from_scheduler_config`'s dict (schedule, prediction,
    spacing, steps_offset). `info` describes the source (written to the CLI's sidecars).
    """

    def __init__(self, *, unet, autoencoder, params: dict, schedule: dict, conditioning: str = "text",
                 text_encoder=None, tokenizer=None, max_length: int | None = None, num_classes: int = 0,
                 variance: str = "fixed_small", defaults: SamplerDefaults = SamplerDefaults(), mesh=None,
                 info: dict | None = None, progress: bool = False):
        if conditioning not in ("text", "class", "none"):
            raise ValueError(f"conditioning={conditioning!r}; allowed: 'text', 'class', 'none'")
        self.unet, self.autoencoder, self.text_encoder = unet, autoencoder, text_encoder
        self.conditioning, self.num_classes, self.variance = conditioning, int(num_classes), variance
        self.tokenizer = tokenizer
        if conditioning == "text":
            self.tokenizer = tokenizer or make_tokenizer(text_encoder.max_position_embeddings)
            self.max_length = int(min(max_length or self.tokenizer.model_max_length,
                                      text_encoder.max_position_embeddings))
        self.defaults, self.info, self.progress = defaults, dict(info or {}), progress
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = jax.device_put(dict(params, scale=np.float32(params["scale"])), sharding.replicated(self.mesh))
        self.scale_factor = float(params["scale"])
        self._set_schedule(schedule)

    def _set_schedule(self, schedule: dict) -> None:
        self.schedule = dict(schedule)
        kwargs = {k: v for k, v in schedule.items() if k not in ("prediction", "spacing", "steps_offset")}
        self.noise_schedule = schedules.make_schedule(kwargs.pop("name"), kwargs.pop("num_timesteps"), **kwargs)
        self.trace_count = 0  # traces of the generation program (tests assert it does not grow)
        self._jitted = jax.jit(self._run, static_argnames="program", compiler_options=compiler_options())
        self._encode_jit, self._decode_jit = jax.jit(self._encode), jax.jit(self._decode)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, ema: bool = True, *, mesh=None,
                     progress: bool = False) -> "LatentDiffusionPipeline":
        """A training run's diffusion model at `step` (default: the latest checkpoint), with its EMA
        parameters (or the raw ones, `ema=False`), its autoencoder and its latent scale factor."""
        from ldm_jax.training import config as config_lib
        from ldm_jax.training import ldm_stage

        workdir = os.path.abspath(os.path.expanduser(workdir))
        config = load_workdir_config(workdir)
        try:  # a hand-edited config.json fails here, naming the key, not in a module's constructor
            config_lib.validate(config)
        except ValueError as e:
            raise ValueError(f"{os.path.join(workdir, 'config.json')}: {e}") from None
        mesh = mesh if mesh is not None else sharding.make_mesh()
        models = ldm_stage.build_models(config)
        state, meta = restore_stage(workdir, "ldm", mesh, step)
        if "scale_factor" not in meta:
            raise ValueError(f"workdir {workdir}: the diffusion checkpoint has no latent scale_factor in its metadata")
        trainable = state["ema_params" if ema else "params"]
        expected = jax.eval_shape(lambda rng: ldm_stage.init_params(config, models, rng), jax.random.PRNGKey(0))
        check_param_shapes(trainable, expected, f"the diffusion checkpoint of {workdir}")
        params = {"unet": trainable["unet"], "scale": meta["scale_factor"],
                  "autoencoder": _workdir_autoencoder_params(config, models.autoencoder, workdir, mesh)}
        if models.conditioning == "text":
            if models.train_text_encoder:
                params["text_encoder"] = trainable["text_encoder"]
            else:
                from ldm_jax.interop import diffusers as hf

                folder = config.text_encoder.source.split(":", 1)[1]
                params["text_encoder"] = hf.load_diffusers_dir(folder).text_encoder_params
        elif models.conditioning == "class":
            params["class_embedder"] = trainable["class_embedder"]
        s = config.sampler
        return cls(unet=models.unet, autoencoder=models.autoencoder, params=params, schedule=workdir_schedule(config),
                   conditioning=models.conditioning, text_encoder=models.text_encoder,
                   tokenizer=make_tokenizer(config.text_encoder.max_length) if models.conditioning == "text" else None,
                   max_length=config.text_encoder.max_length, num_classes=models.null_class,
                   variance=config.diffusion.variance,
                   defaults=SamplerDefaults(s.name, s.num_steps, s.guidance_scale, s.guidance_rescale, s.eta),
                   mesh=mesh, progress=progress,
                   info=dict(kind="workdir", path=workdir, step=int(state["step"]), ema=bool(ema)))

    @classmethod
    def from_diffusers_dir(cls, path: str, *, dtype=None, mesh=None,
                           progress: bool = False) -> "LatentDiffusionPipeline":
        """A local diffusers-format Stable Diffusion folder (SD 1.x / 2.x, eps or v prediction as its
        scheduler config says; a 9-channel inpainting UNet is used as such by `inpaint`)."""
        from ldm_jax.interop import diffusers as hf

        path = os.path.abspath(os.path.expanduser(path))
        c = hf.load_diffusers_dir(path, dtype=dtype)
        params = {"unet": c.unet_params, "text_encoder": c.text_encoder_params, "autoencoder": c.vae_params,
                  "scale": c.vae.scaling_factor}
        sampler = SCHEDULER_SAMPLERS.get((c.scheduler_config or {}).get("_class_name"), "ddim")
        return cls(unet=c.unet, autoencoder=c.vae, params=params, schedule=c.schedule, text_encoder=c.text_encoder,
                   tokenizer=c.tokenizer, defaults=SamplerDefaults(sampler=sampler), mesh=mesh, progress=progress,
                   info=dict(kind="diffusers", path=path))

    def with_scheduler(self, scheduler_config) -> "LatentDiffusionPipeline":
        """The same weights with the schedule, spacing and default sampler of a diffusers scheduler
        config (a dict as in scheduler_config.json, or a diffusers scheduler object)."""
        from ldm_jax.interop import diffusers as hf

        if hasattr(scheduler_config, "config"):  # a scheduler object: its config, and its class
            scheduler_config = {**scheduler_config.config, "_class_name": type(scheduler_config).__name__}
        other = copy.copy(self)
        other.defaults = self.defaults._replace(
            sampler=SCHEDULER_SAMPLERS.get(scheduler_config.get("_class_name"), self.defaults.sampler))
        other._set_schedule(hf.schedule_from_scheduler_config(dict(scheduler_config)))
        return other

    def with_spacing(self, spacing: str) -> "LatentDiffusionPipeline":
        """The same weights and schedule, visiting the sampler's timesteps with another spacing
        ("leading", "trailing" or "linspace": `samplers.timesteps`; Lin et al. 2024, Table 2)."""
        gaussian.check_choice("spacing", spacing, samplers.SPACINGS)
        other = copy.copy(self)
        other._set_schedule({**self.schedule, "spacing": spacing})
        return other

    # ----------------------------------------------------------------------------- sizes

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel (1 for pixel-space models)."""
        blocks = getattr(self.autoencoder, "block_out_channels", None)
        return 2 ** (len(blocks) - 1) if blocks else 1

    @property
    def clip_x0(self) -> float | None:
        """Pixel-space models clip the predicted x_0 to the data's [-1, 1] at every step (DDPM's
        sampler does): near t = T, abar_T is ~1e-9 under the cosine schedule, and the x_0 implied by
        an eps error of 1% is off by hundreds without it. Latents have no such bound."""
        return 1.0 if self.autoencoder_is_identity else None

    @property
    def autoencoder_is_identity(self) -> bool:
        from ldm_jax.training.autoencoder_stage import IdentityAutoencoder

        return isinstance(self.autoencoder, IdentityAutoencoder)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: the autoencoder's factor times the UNet's."""
        return self.downsampling_factor * 2 ** (len(self.unet.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return getattr(self.autoencoder, "latent_channels", None) or 3

    @property
    def is_inpainting_model(self) -> bool:
        """A UNet that takes [latents, mask, masked-image latents] (SD inpainting, 9 channels)."""
        return self.unet.in_channels == 2 * self.latent_channels + 1

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
        x = self._images_in(images)
        return np.asarray(self._encode_jit(self.params, jnp.asarray(x)))

    def decode(self, latents) -> np.ndarray:
        """Scaled latents [B, h, w, c] -> uint8 images [B, H, W, 3]."""
        return np.asarray(self._decode_jit(self.params, jnp.asarray(latents, jnp.float32)))

    # ----------------------------------------------------------------------------- host side

    def _conditions(self, prompts, negative_prompts):
        """(cond, uncond) as arrays: token ids [B, L] or labels [B]."""
        if isinstance(prompts, (str, int, np.integer)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty: give at least one prompt")
        if self.conditioning == "class":
            if not all(isinstance(p, (int, np.integer)) for p in prompts):
                raise ValueError(f"this model is class-conditional: give class labels (ints in [0, "
                                 f"{self.num_classes})) instead of prompts, got {prompts[:3]!r}")
            bad = [p for p in prompts if not 0 <= p < self.num_classes]
            if bad:
                raise ValueError(f"class labels {bad} are outside [0, {self.num_classes})")
            cond = np.asarray(prompts, np.int32)
            return cond, np.full_like(cond, self.num_classes)
        if self.conditioning == "none":
            zeros = np.zeros((len(prompts),), np.int32)
            return zeros, zeros
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"this model is text-conditional: prompts must be strings, got {prompts[:3]!r}")
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        return (tokenize(self.tokenizer, prompts, self.max_length),
                tokenize(self.tokenizer, list(negative_prompts), self.max_length))

    @staticmethod
    def _images_in(images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (uint8, or float in [-1, 1]); got shape {images.shape}")
        if images.dtype == np.uint8:
            return images.astype(np.float32) / 127.5 - 1.0
        return images.astype(np.float32)

    @staticmethod
    def _masks_in(masks, images: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim == 4 and masks.shape[-1] == 1:
            masks = masks[..., 0]
        if masks.ndim == 3 and masks.shape[0] == 1 and images.shape[0] > 1:
            masks = np.repeat(masks, images.shape[0], axis=0)
        if masks.ndim != 3 or masks.shape != images.shape[:3]:
            raise ValueError(f"mask size {tuple(masks.shape[-2:]) if masks.ndim >= 2 else masks.shape} does not "
                             f"match the image size {tuple(images.shape[1:3])} (masks [B, H, W], one per image)")
        threshold = 127.5 if masks.dtype == np.uint8 else 0.5
        return (masks > threshold).astype(np.float32)[..., None]

    def _check_size(self, height: int, width: int) -> None:
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
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(samplers.SAMPLERS)}")
        T = self.noise_schedule.num_timesteps
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
            x = self._images_in(images)
            if len(x) == 1 and batch > 1:
                x = np.repeat(x, batch, axis=0)
            if len(x) != batch:
                raise ValueError(f"{len(x)} images for {batch} prompts")
            height, width = x.shape[1:3]
            self._check_size(height, width)
            inputs["images"] = x
            if task == "inpaint":
                inputs["masks"] = self._masks_in(masks, x)
            if not 0.0 <= strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
            start_step = num_steps - min(int(num_steps * strength), num_steps)
        else:
            height = self.default_size if height is None else int(height)
            width = self.default_size if width is None else int(width)
            self._check_size(height, width)
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
        program = _Program(task, padded, latent_shape[1:3], sampler, int(num_steps), int(start_step), int(record),
                           output_type, bool(self.progress and visited))
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
        if self.conditioning == "text":
            return self.text_encoder.apply({"params": params["text_encoder"]}, cond)[0]
        if self.conditioning == "class":
            return params["class_embedder"][cond][:, None, :]
        return jnp.zeros((cond.shape[0], 1, self.unet.cross_attention_dim), jnp.float32)

    def _encode(self, params, images):
        posterior = self.autoencoder.apply({"params": params["autoencoder"]}, images, method="encode")
        z = posterior.mode() if hasattr(posterior, "mode") else posterior
        return z * params["scale"]

    def _decode_float(self, params, z):
        return self.autoencoder.apply({"params": params["autoencoder"]}, z / params["scale"], method="decode")

    def _decode(self, params, z):
        return _to_uint8(self._decode_float(params, z))

    def _run(self, params, inputs, *, program: _Program):
        """The compiled program: encode conditions (and images), sample, decode."""
        self.trace_count += 1
        batch_sharding = sharding.batch_sharding(self.mesh)
        shape = (program.batch, *program.latent_hw, self.latent_channels)
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(inputs["keys"])
        noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys[:, 0])
        x = inputs.get("latents", noise)

        z0 = extra = blend = None
        if program.task != "text":
            z0 = self._encode(params, inputs["images"])
        if program.task == "inpaint":
            f = self.downsampling_factor
            m = inputs["masks"]  # [B, H, W, 1], 1 = repaint
            m_lat = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1), "VALID")
            if self.is_inpainting_model:
                extra = jnp.concatenate([m_lat, self._encode(params, inputs["images"] * (1.0 - m))], axis=-1)
            else:
                blend = {"z0": z0, "noise": noise, "keep": 1.0 - m_lat}
        start, visited = program.start_step, program.num_steps - program.start_step
        s = self.schedule
        if program.task == "image" or start:  # img2img always starts from the noised image
            abar = samplers.alpha_bar_at(self.noise_schedule, program.sampler, program.num_steps, start,
                                         spacing=s["spacing"], steps_offset=s["steps_offset"]) if visited else 1.0
            x = math.sqrt(abar) * z0 + math.sqrt(1.0 - abar) * noise
        x = jax.lax.with_sharding_constraint(x, batch_sharding)

        inter = None
        if visited:
            unet = self.unet

            def unet_fn(unet_params, extra, x_t, t, context):
                if extra is not None:  # [x_t, mask, masked latents]; x_t may be [uncond; cond]
                    x_t = jnp.concatenate([x_t, jnp.tile(extra, (x_t.shape[0] // extra.shape[0], 1, 1, 1))], -1)
                return unet.apply({"params": unet_params}, x_t, t, context)

            context = self._context(params, inputs["cond"])
            if self.conditioning == "none":
                model = Partial(lambda p, e, c, x_t, t: unet_fn(p, e, x_t, t, c), params["unet"], extra, context)
            else:
                model = samplers.classifier_free_guidance(
                    Partial(unet_fn, params["unet"], extra), context, self._context(params, inputs["uncond"]),
                    inputs["guidance"], inputs["rescale"])
            hook = None
            if program.progress:
                every = max(1, math.ceil(visited / PROGRESS_TICKS))
                hook = Partial(_blend_and_tick, blend, {"start": np.int32(start), "every": np.int32(every),
                                                        "last": np.int32(program.num_steps - 1)})
            elif blend is not None:
                hook = Partial(_blend, blend)
            result = samplers.sample(
                model, self.noise_schedule, shape, keys[:, 1], sampler=program.sampler, num_steps=program.num_steps,
                prediction=s["prediction"], eta=inputs["eta"], variance=self.variance, spacing=s["spacing"],
                steps_offset=s["steps_offset"], x_T=x, return_trajectory=program.record_every, start_step=start,
                after_step=hook, clip_x0=self.clip_x0)
            z, traj = result if program.record_every else (result, None)
            if traj is not None:
                n = traj["x_t"].shape[0]
                previews = lambda y: self._decode(params, y.reshape((n * shape[0],) + shape[1:])).reshape(  # noqa: E731
                    (n, shape[0]) + self._decode_shape(program))
                inter = {"x_t": previews(traj["x_t"]), "pred_x0": previews(traj["pred_x0"]), "t": traj["t"]}
        else:  # strength 0: nothing to denoise
            z = x
        z = jax.lax.with_sharding_constraint(z, batch_sharding)
        if program.output_type == "latent":
            return z, inter
        images = self._decode_float(params, z)
        if program.output_type == "float":
            return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0), inter
        return _to_uint8(images), inter

    def _decode_shape(self, program: _Program) -> tuple:
        f = self.downsampling_factor
        return (program.latent_hw[0] * f, program.latent_hw[1] * f, 3)


def _to_uint8(images):
    """[-1, 1] floats -> uint8 [0, 255], rounded (as the training loop's samples)."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
