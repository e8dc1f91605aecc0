"""The linen modules a config describes, and their constructor arguments: every choice of module
(autoencoder kind, dtype) made here, once.

    unet = UNet(**unet_kwargs(config))                        # in/out channels, size, dtype filled in
    vae = make_autoencoder(config.autoencoder, config.data.image_size)   # KL, VQ or identity
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.data.pipeline import DataConfig
from ldm_jax.models.autoencoder import AutoencoderKL, IdentityAutoencoder, PatchDiscriminator, VQAutoencoder

AUTOENCODER_KINDS = ("kl", "vq", "identity")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def module_fields(cls) -> set[str]:
    """The constructor arguments of a dataclass or linen module (without linen's parent/name)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return fields - {"parent", "name"} if issubclass(cls, nn.Module) else fields


def check_arguments(cls, kwargs: dict, group: str) -> None:
    """ValueError naming the keys of `kwargs` that are not arguments of `cls` (config group `group`)."""
    allowed = module_fields(cls)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{group}: {', '.join(unknown)} not arguments of {cls.__name__}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def as_dict(group) -> dict:
    """A config group (ConfigDict or mapping) as a plain dict, sequences as tuples (hashable)."""
    group = group.to_dict() if hasattr(group, "to_dict") else dict(group)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}


def check_kind(ae_config) -> str:
    kind = ae_config["kind"]
    if kind not in AUTOENCODER_KINDS:
        raise ValueError(f"unknown autoencoder.kind {kind!r}; allowed: {', '.join(AUTOENCODER_KINDS)}")
    return kind


def _downsampling(model: dict, default_blocks) -> int:
    return 2 ** (len(model.get("block_out_channels", default_blocks)) - 1)


def make_autoencoder(ae_config, image_size: int) -> nn.Module:
    """The linen autoencoder for ``autoencoder.kind``: "kl" -> ``AutoencoderKL(**model)``,
    "vq" -> ``VQAutoencoder(**model, **vq)``, "identity" -> ``IdentityAutoencoder()``.

    Validates the group first (kind, constructor arguments, channels vs. GroupNorm groups, image
    size vs. the downsampling factor) so a bad config fails before anything compiles.
    """
    kind = check_kind(ae_config)
    if kind == "identity":
        return IdentityAutoencoder()
    model = as_dict(ae_config["model"])
    if kind == "kl":
        cls, defaults = AutoencoderKL, AutoencoderKL()
        model.setdefault("sample_size", image_size)
    else:
        cls, defaults = VQAutoencoder, VQAutoencoder()
        # The VQ model always has the mid-block attention (LDM VQ-f4); accept the KL-only key
        # only when it says so.
        if not model.pop("mid_block_add_attention", True):
            raise ValueError("autoencoder.model.mid_block_add_attention=False is not supported "
                             "with autoencoder.kind='vq' (its mid block always has attention)")
        model.update(as_dict(ae_config["vq"]))
    check_arguments(cls, model, "autoencoder.model" if kind == "kl" else "autoencoder.model/vq")
    groups = model.get("norm_num_groups", defaults.norm_num_groups)
    for c in model.get("block_out_channels", defaults.block_out_channels):
        if c % groups:
            raise ValueError(f"autoencoder.model.block_out_channels entry {c} is not divisible by "
                             f"autoencoder.model.norm_num_groups={groups}")
    f = _downsampling(model, defaults.block_out_channels)
    if image_size % f:
        raise ValueError(f"data.image_size={image_size} is not divisible by the autoencoder's "
                         f"downsampling factor {f} (2^(len(autoencoder.model.block_out_channels) - 1))")
    return cls(**model)


def autoencoder_latent_shape(ae_config, image_size: int) -> tuple[int, int, int]:
    """(h, w, c) of the latents the diffusion model sees for ``image_size`` images."""
    module = make_autoencoder(ae_config, image_size)
    if isinstance(module, IdentityAutoencoder):
        return image_size, image_size, 3
    f = 2 ** (len(module.block_out_channels) - 1)
    return image_size // f, image_size // f, module.latent_channels


def make_discriminator(ae_config) -> PatchDiscriminator:
    """``PatchDiscriminator(**autoencoder.disc)``."""
    disc = as_dict(ae_config["disc"])
    check_arguments(PatchDiscriminator, disc, "autoencoder.disc")
    return PatchDiscriminator(**disc)


def check_losses(ae_config):
    """ValueError naming the key unless autoencoder.lpips_weights is None or an existing path and
    autoencoder.perceptual_weight is a number >= 0."""
    path = ae_config["lpips_weights"]
    if path is not None and not (isinstance(path, (str, os.PathLike))
                                 and os.path.exists(os.path.expanduser(path))):
        raise ValueError(f"autoencoder.lpips_weights={path!r} is not an existing path; give a local "
                         "LPIPS weights file (see ldm_jax.models.lpips for getting one), or None "
                         "for L1 reconstruction only")
    weight = ae_config.get("perceptual_weight", 1.0)
    if not (isinstance(weight, (int, float)) and weight >= 0):
        raise ValueError(f"autoencoder.perceptual_weight={weight!r} must be a number >= 0")


def compute_dtype(config):
    """The activation dtype named by `train.dtype` (parameters stay float32)."""
    return DTYPES[config.train.dtype]


def latent_shape(config) -> tuple[int, int, int]:
    """(h, w, c) of what the diffusion model sees: autoencoder latents, or pixels for "identity"."""
    return autoencoder_latent_shape(config.autoencoder, config.data.image_size)


def unet_out_channels(config) -> int:
    """Latent channels, doubled for a learned variance (Improved DDPM: the output carries v too)."""
    c = latent_shape(config)[-1]
    return 2 * c if config.diffusion.variance == "learned_range" else c


def unet_kwargs(config) -> dict:
    """`UNet(**unet_kwargs(config))`: the `unet` group plus what other groups decide (channels in
    and out, nominal sample size, dtype, rematerialisation)."""
    h, _, c = latent_shape(config)
    return {**config.unet.to_dict(), "in_channels": c, "out_channels": unet_out_channels(config),
            "sample_size": h, "remat": bool(config.train.remat), "dtype": compute_dtype(config)}


def text_encoder_kwargs(config) -> dict:
    """`CLIPTextEncoder(**text_encoder_kwargs(config))`."""
    return {**config.text_encoder.model.to_dict(), "dtype": compute_dtype(config)}


def likelihood_decoder(config) -> str:
    """The t = 0 term of the bound: discretized (8-bit pixels) in pixel space, else continuous."""
    return "discretized" if config.autoencoder.kind == "identity" else "continuous"


def data_config(config, batch_size: int | None = None, split: str | None = None, **overrides) -> DataConfig:
    """The input pipeline's settings for `config` (its `data` group, tokenized at
    `text_encoder.max_length` for text models, captions dropped otherwise), with overrides."""
    d = dict(config.data)
    d["batch_size"] = batch_size or d["batch_size"]
    d["split"] = split or d["split"]
    if config.conditioning.kind == "text":
        d["max_length"] = config.text_encoder.max_length
    else:
        d["caption_key"] = None  # labels only (class) or nothing (unconditional)
    d.update(overrides)
    return DataConfig.from_dict(d)
