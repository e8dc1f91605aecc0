"""Autoencoder adapters: what the latent diffusion model needs of its autoencoder, whatever the
kind — a KL model (a Gaussian posterior per image), a VQ model (LDM's VQ path: its continuous
pre-quantisation latents) or none (pixel-space diffusion: the identity).

    codec = make_codec(module)                 # module: AutoencoderKL | VQAutoencoder | IdentityAutoencoder
    z = codec.encode_sample(ae_params, images, rng)   # unscaled latents (a posterior sample)
    images = codec.decode(ae_params, z)

Latents here are unscaled; `LatentDiffusion` applies the latent scale factor. The kind is decided
once, by `config.modules.make_autoencoder` (which module) and `make_codec` (which adapter).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, IdentityAutoencoder, VQAutoencoder


@dataclasses.dataclass(frozen=True, eq=False)
class Codec:
    """A linen autoencoder `module` seen through the interface above."""

    module: nn.Module
    is_identity = False
    # Pixel-space models clip the predicted x_0 to the data's [-1, 1] at every sampler step (DDPM's
    # sampler does): near t = T, abar_T is ~1e-9 under the cosine schedule, and the x_0 implied by an
    # eps error of 1% is off by hundreds without it. Latents have no such bound.
    clip_x0: float | None = None

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel."""
        return 2 ** (len(self.module.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.module.latent_channels

    def latent_size(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(h, w, c) of the latents of height x width images."""
        f = self.downsampling_factor
        return height // f, (height if width is None else width) // f, self.latent_channels

    def encode_sample(self, ae_params, images, rng):
        """A sample of the posterior of `images` [B, H, W, 3] in [-1, 1] (unscaled)."""
        return self.module.apply({"params": ae_params}, images, method="encode").sample(rng)

    def encode_mode(self, ae_params, images):
        """The posterior's mode (deterministic encoding, unscaled)."""
        return self.module.apply({"params": ae_params}, images, method="encode").mode()

    def decode(self, ae_params, z):
        """Unscaled latents -> images in about [-1, 1], float32."""
        return self.module.apply({"params": ae_params}, z, method="decode")

    # The latent table (train.cache_latents): what to store per image, and a draw from it.
    @property
    def moments_channels(self) -> int:
        return self.latent_channels

    def moments(self, ae_params, images):
        return self.encode_mode(ae_params, images)

    def sample_moments(self, moments, rng):
        del rng
        return moments


class KLCodec(Codec):
    """AutoencoderKL: a diagonal Gaussian posterior; the table stores [mean, logvar]."""

    @property
    def moments_channels(self) -> int:
        return 2 * self.latent_channels

    def moments(self, ae_params, images):
        out = self.module.apply({"params": ae_params}, images, method="encode")
        return jnp.concatenate([out.mean, out.logvar], axis=-1)

    def sample_moments(self, moments, rng):
        return DiagonalGaussian.from_moments(moments).sample(rng)


class VQCodec(Codec):
    """VQAutoencoder: `encode` gives the continuous pre-quantisation latents (LDM's VQ path),
    used as they are; `decode` quantises them."""

    def encode_sample(self, ae_params, images, rng):
        del rng
        return self.module.apply({"params": ae_params}, images, method="encode")

    def encode_mode(self, ae_params, images):
        return self.module.apply({"params": ae_params}, images, method="encode")


@dataclasses.dataclass(frozen=True, eq=False)
class IdentityCodec(Codec):
    """No autoencoder: latents are the pixels ([-1, 1], 3 channels); no parameters."""

    is_identity = True
    clip_x0: float | None = 1.0

    @property
    def downsampling_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return 3

    def encode_sample(self, ae_params, images, rng):
        del ae_params, rng
        return jnp.asarray(images, jnp.float32)

    def encode_mode(self, ae_params, images):
        del ae_params
        return jnp.asarray(images, jnp.float32)

    def decode(self, ae_params, z):
        del ae_params
        return jnp.asarray(z, jnp.float32)


CODECS = {AutoencoderKL: KLCodec, VQAutoencoder: VQCodec, IdentityAutoencoder: IdentityCodec}


def make_codec(module: nn.Module) -> Codec:
    """The adapter for an autoencoder module (ours, or one converted from diffusers)."""
    for cls, codec in CODECS.items():
        if isinstance(module, cls):
            return codec(module)
    raise TypeError(f"no latent codec for {type(module).__name__}; known: {', '.join(c.__name__ for c in CODECS)}")


def to_uint8(images):
    """[-1, 1] floats -> uint8 [0, 255], rounded (jax arrays stay on the device, numpy on the host)."""
    xp = jnp if isinstance(images, jax.Array) else np
    images = xp.asarray(images, xp.float32)
    return xp.clip(xp.round((images + 1.0) * 127.5), 0, 255).astype(xp.uint8)
