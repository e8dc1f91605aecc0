"""The compiled generation program behind `LatentDiffusionPipeline`, and its host-side helpers.

`run_program(model, params, inputs, program, mesh)` is one jittable function: draw each image's
noise from its own key, encode the init image (image -> image, inpainting), sample with the model's
guided model function (`LatentDiffusion.sample`), decode. Everything static about it is a
`Program`; prompts, seeds, guidance, eta, images and masks are traced inputs. A progress bar ticks
from inside the compiled loop through `jax.debug.callback` (`ProgressRelay`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.diffusion import samplers, sd_schedulers
from ldm_jax.ldm import LatentDiffusion, to_uint8
from ldm_jax.runtime import sharding

OUTPUT_TYPES = ("uint8", "float", "latent")
PROGRESS_TICKS = 20  # host callbacks per sampling run, at most (each costs ~1-2 ms on a CPU host)


class Program(NamedTuple):
    """Everything static about one compiled generation program."""

    task: str  # "text" | "image" | "inpaint"
    batch: int  # padded to the device count
    latent_hw: tuple
    sampler: str | sd_schedulers.Scheduler  # a sampler's name, or a diffusers scheduler run exactly
    num_steps: int
    start_step: int  # SDEdit: steps skipped (num_steps: nothing left to denoise)
    record_every: int  # intermediates every k steps (0: none)
    output_type: str
    progress: bool
    spacing: str = "leading"
    steps_offset: int = 0
    mask_downsampling: str = "max"  # "max": a latent cell is repainted if any pixel is; "nearest": diffusers'


# ---------------------------------------------------------------------------------------------
# Progress: the compiled loop calls _tick every few steps; the relay forwards to the open bar.


class ProgressRelay:
    """The host side of the progress callbacks: the open tqdm bar (if any) and step counts."""

    def __init__(self):
        self.bar = None  # the open tqdm bar, if any
        self.done = 0  # steps of the current run reported so far
        self.ticks = 0  # steps reported over all runs (tests read it)


RELAY = ProgressRelay()


def _tick(done):
    delta = int(done) - RELAY.done
    if delta > 0:
        RELAY.done, RELAY.ticks = int(done), RELAY.ticks + delta
        if RELAY.bar is not None:
            RELAY.bar.update(delta)


def _blend(blend, x, i, abar_next):
    """Per-step hook of inpainting: the known region put back at x's noise level (diffusers'
    4-channel inpainting); exactly the known latents after the last step (abar_next = 1). For a
    continuous process, x_t = alpha z0 + sigma eps with alpha^2 + sigma^2 = scale^2 at the next
    time (the samplers' abar_next is alpha^2 / scale^2): blend["scale"][i] holds that scale."""
    if blend is None:
        return x
    known = jnp.sqrt(abar_next) * blend["z0"] + jnp.sqrt(1.0 - abar_next) * blend["noise"]
    if "scale" in blend:
        known = blend["scale"][i] * known
    return blend["keep"] * known + (1.0 - blend["keep"]) * x


def _blend_and_tick(blend, progress, x, i, abar_next):
    """`_blend`, and every `progress["every"]` steps (and at the last) a host callback that moves
    the progress bar: part of the compiled loop, a `lax.cond` away from costing every step."""
    done = i - progress["start"] + 1
    report = (done % progress["every"] == 0) | (i == progress["last"])
    jax.lax.cond(report, lambda d: jax.debug.callback(_tick, d), lambda d: None, done)
    return _blend(blend, x, i, abar_next)


# ---------------------------------------------------------------------------------------------
# Host-side inputs


def images_in(images) -> np.ndarray:
    """uint8 [B, H, W, 3] (or float in [-1, 1]; one image [H, W, 3]) -> float32 in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (uint8, or float in [-1, 1]); got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def masks_in(masks, images: np.ndarray) -> np.ndarray:
    """Masks [B, H, W] / [B, H, W, 1] / [H, W] (> 0.5, or > 127 for uint8: repaint) -> float32
    {0, 1} [B, H, W, 1] matching `images`."""
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


def is_inpainting_model(model: LatentDiffusion) -> bool:
    """A UNet that takes [latents, mask, masked-image latents] (SD inpainting, 9 channels)."""
    return model.unet.in_channels == 2 * model.codec.latent_channels + 1


# ---------------------------------------------------------------------------------------------
# The compiled program


def run_program(model: LatentDiffusion, params, inputs, *, program: Program, mesh):
    """Encode the conditions (and images), sample, decode: (output, intermediates or None)."""
    batch_sharding = sharding.batch_sharding(mesh)
    shape = (program.batch, *program.latent_hw, model.codec.latent_channels)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(inputs["keys"])
    # The noise: drawn from each image's key, or the given latents (for every task, as diffusers'
    # inpainting takes them: the start and the noise the known region is blended with).
    noise = inputs["latents"] if "latents" in inputs else jax.vmap(
        lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys[:, 0])
    x = noise
    scheduler = program.sampler if isinstance(program.sampler, sd_schedulers.Scheduler) else None
    if scheduler is not None:  # diffusers' prepare_latents: x_T * init_noise_sigma
        plan = sd_schedulers.plan(scheduler, program.num_steps, min(program.start_step, program.num_steps - 1))
        x = sd_schedulers.start_state(plan, x)
    elif model.continuous:  # x_T ~ N(0, prior_std^2), as diffusers' init_noise_sigma (EDM: sqrt(sigma_max^2 + 1))
        x = x * model.process_of(params).prior_std

    z0 = extra = blend = None
    if program.task != "text":
        z0 = model.encode(params, inputs["images"])
    if program.task == "inpaint":
        f = model.codec.downsampling_factor
        m = inputs["masks"]  # [B, H, W, 1], 1 = repaint
        if program.mask_downsampling == "nearest":  # torch's interpolate(mode="nearest"): each cell's first pixel
            m_lat = m[:, ::f, ::f, :]
        else:
            m_lat = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1), "VALID")
        if is_inpainting_model(model):
            extra = jnp.concatenate([m_lat, model.encode(params, inputs["images"] * (1.0 - m))], axis=-1)
        else:
            blend = {"z0": z0, "noise": noise, "keep": 1.0 - m_lat}
            if model.continuous:  # sqrt(alpha^2 + sigma^2) after each step of the process's grid
                alpha, sigma = model.process_of(params).alpha_sigma(
                    jnp.asarray(model.process.time_grid(program.num_steps)[1:]))
                blend["scale"] = jnp.sqrt(jnp.square(alpha) + jnp.square(sigma))
    start, visited = program.start_step, program.num_steps - program.start_step
    if program.task == "image" or start:  # img2img always starts from the noised image
        if scheduler is not None:
            x = sd_schedulers.start_state(plan, noise, z0) if visited else z0
        elif model.continuous:
            x = model.noised(params, z0, noise, program.num_steps, start)
        else:
            abar = samplers.alpha_bar_at(model.schedule, program.sampler, program.num_steps, start,
                                         spacing=program.spacing, steps_offset=program.steps_offset) if visited else 1.0
            x = math.sqrt(abar) * z0 + math.sqrt(1.0 - abar) * noise
    x = jax.lax.with_sharding_constraint(x, batch_sharding)

    inter = None
    if visited:
        hook = None
        if program.progress:
            every = max(1, math.ceil(visited / PROGRESS_TICKS))
            hook = Partial(_blend_and_tick, blend, {"start": np.int32(start), "every": np.int32(every),
                                                    "last": np.int32(program.num_steps - 1)})
        elif blend is not None:
            hook = Partial(_blend, blend)
        result = model.sample(params, inputs["cond"], inputs["uncond"], keys[:, 1], sampler=program.sampler,
                              num_steps=program.num_steps, guidance=inputs["guidance"], rescale=inputs["rescale"],
                              eta=inputs["eta"], shape=shape, extra=extra, spacing=program.spacing,
                              steps_offset=program.steps_offset, x_T=x, return_trajectory=program.record_every,
                              start_step=start, after_step=hook)
        z, traj = result if program.record_every else (result, None)
        if traj is not None:
            n = traj["x_t"].shape[0]
            f = model.codec.downsampling_factor
            image_shape = (program.latent_hw[0] * f, program.latent_hw[1] * f, 3)

            def previews(y):
                return model.decode_uint8(params, y.reshape((n * shape[0],) + shape[1:])).reshape(
                    (n, shape[0]) + image_shape)

            inter = {"x_t": previews(traj["x_t"]), "pred_x0": previews(traj["pred_x0"]), "t": traj["t"]}
    else:  # strength 0: nothing to denoise
        z = x
    z = jax.lax.with_sharding_constraint(z, batch_sharding)
    if program.output_type == "latent":
        return z, inter
    images = model.decode(params, z)
    if program.output_type == "float":
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0), inter
    return to_uint8(images), inter
