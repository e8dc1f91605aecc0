"""Image autoencoders for latent diffusion: KL (diffusers ``AutoencoderKL`` compatible), VQ, and
the PatchGAN discriminator used to train them (LDM / taming-transformers recipe).

Parameter trees mirror diffusers (``encoder/down_blocks_0/resnets_0/conv1/kernel`` for
``encoder.down_blocks.0.resnets.0.conv1.weight``); ``ldm_jax.interop.vae_weights`` converts.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (AttentionBlock, AttentionImpl, Downsample, ResnetBlock,
                                   Upsample, group_norm)

Dtype = Any


@flax.struct.dataclass
class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` over latents ``[B, h, w, c]`` (float32)."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split ``[..., 2c]`` into mean and log-variance; log-variance clipped to [-30, 20]
        (as diffusers / LDM do)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised sample ``mean + std * eps``."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over latent dims: ``0.5 sum(mu^2 + var - 1 - logvar)``."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class _MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, spatial attention, resnet."""
    channels: int
    norm_num_groups: int = 32
    add_attention: bool = True
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = lambda name: ResnetBlock(self.channels, self.norm_num_groups, 1e-6, name=name, **kw)
        x = res("resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(heads=1, norm_num_groups=self.norm_num_groups, norm_eps=1e-6,
                               implementation=self.attention_implementation,
                               query_chunk_size=self.query_chunk_size, name="attentions_0", **kw)(x)
        return res("resnets_1")(x)


class _DownEncoderBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: resnets, then (except at the last level) a stride-2 conv
    padded on the bottom/right only."""
    channels: int
    num_layers: int
    norm_num_groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.norm_num_groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = Downsample(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class _UpDecoderBlock(nn.Module):
    """diffusers ``UpDecoderBlock2D``: resnets, then (except at the last level) 2x upsampling."""
    channels: int
    num_layers: int
    norm_num_groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.channels, self.norm_num_groups, 1e-6, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """diffusers ``Encoder``: conv_in, down blocks, mid block, GroupNorm, SiLU, conv_out to
    ``out_channels`` (``2 * latent_channels`` for a KL posterior)."""
    out_channels: int
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, C_in] -> [B, H/f, W/f, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv3 = lambda f, name: nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), name=name, **kw)
        x = conv3(self.block_out_channels[0], "conv_in")(x.astype(self.dtype))
        n = len(self.block_out_channels)
        for i, c in enumerate(self.block_out_channels):
            x = _DownEncoderBlock(c, self.layers_per_block, self.norm_num_groups, i < n - 1,
                                  name=f"down_blocks_{i}", **kw)(x)
        x = _MidBlock(self.block_out_channels[-1], self.norm_num_groups,
                      self.mid_block_add_attention, self.attention_implementation,
                      self.query_chunk_size, name="mid_block", **kw)(x)
        x = nn.silu(group_norm(self.norm_num_groups, 1e-6, self.dtype, self.param_dtype,
                                "conv_norm_out")(x))
        return conv3(self.out_channels, "conv_out")(x)


class Decoder(nn.Module):
    """diffusers ``Decoder``: conv_in, mid block, up blocks (``layers_per_block + 1`` resnets
    each, channels reversed), GroupNorm, SiLU, conv_out."""
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):  # [B, h, w, c] -> [B, h*f, w*f, out_channels]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv3 = lambda f, name: nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), name=name, **kw)
        x = conv3(self.block_out_channels[-1], "conv_in")(z.astype(self.dtype))
        x = _MidBlock(self.block_out_channels[-1], self.norm_num_groups,
                      self.mid_block_add_attention, self.attention_implementation,
                      self.query_chunk_size, name="mid_block", **kw)(x)
        n = len(self.block_out_channels)
        for i, c in enumerate(reversed(self.block_out_channels)):
            x = _UpDecoderBlock(c, self.layers_per_block + 1, self.norm_num_groups, i < n - 1,
                                name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(group_norm(self.norm_num_groups, 1e-6, self.dtype, self.param_dtype,
                                "conv_norm_out")(x))
        return conv3(self.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM "KL-f8"; diffusers ``AutoencoderKL``).

    ``vae.apply({"params": p}, images, method="encode")`` -> ``DiagonalGaussian`` posterior over
    unscaled latents; ``method="decode"`` maps unscaled latents back to images. The diffusion model
    works on ``z * scaling_factor``. ``__call__`` (training) = encode, sample (rng stream
    ``"sample"``, or the mode when ``sample_posterior=False``), decode -> ``(images, posterior)``.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512  # nominal image resolution (metadata for pipelines and export)
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"AutoencoderKL: block_out_channels entry {c} is not divisible "
                                 f"by norm_num_groups={self.norm_num_groups}")
        kw = dict(block_out_channels=self.block_out_channels,
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention,
                  attention_implementation=self.attention_implementation,
                  query_chunk_size=self.query_chunk_size, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.encoder = Encoder(2 * self.latent_channels, **kw)
        self.decoder = Decoder(self.out_channels, **kw)
        conv_kw = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, **conv_kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, **conv_kw)

    def encode(self, images) -> DiagonalGaussian:
        """images ``[B, H, W, 3]`` in [-1, 1] -> posterior over ``[B, H/f, W/f, latent_channels]``."""
        h = self.encoder(images)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z):
        """Unscaled latents ``[B, h, w, c]`` -> images ``[B, h*f, w*f, 3]`` (float32)."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images, sample_posterior: bool = True):
        posterior = self.encode(images)
        z = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantisation with a straight-through estimator (VQ-VAE,
    van den Oord et al. 2017, eq. 3).

    Returns ``(z_q, aux)``: ``z_q = z + stop_gradient(e_k - z)`` (forward: the nearest code; backward:
    identity), and ``aux`` with ``loss = codebook + beta * commitment`` where
    ``codebook = mean ||sg(z) - e||^2`` and ``commitment = mean ||z - sg(e)||^2``, the code
    ``indices``, the ``perplexity`` ``exp(H(p))`` of the batch's code histogram ``p`` and
    ``usage``, the fraction of codes used in the batch.
    """
    num_codes: int
    embed_dim: int
    beta: float = 0.25
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):  # [..., embed_dim]
        k = self.num_codes
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
        codebook = self.param("embedding", init, (k, self.embed_dim), self.param_dtype)  # U(-1/K, 1/K)
        codebook = codebook.astype(jnp.float32)
        z = z.astype(jnp.float32)
        flat = z.reshape(-1, self.embed_dim)
        d = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ codebook.T
             + jnp.sum(codebook ** 2, -1)[None, :])  # [N, K] squared distances
        idx = jnp.argmin(d, axis=-1)
        e = codebook[idx].reshape(z.shape)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
        commitment_loss = jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        z_q = z + jax.lax.stop_gradient(e - z)
        p = jnp.mean(jax.nn.one_hot(idx, k, dtype=jnp.float32), axis=0)
        perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))
        aux = dict(loss=codebook_loss + self.beta * commitment_loss, codebook_loss=codebook_loss,
                   commitment_loss=commitment_loss, indices=idx.reshape(z.shape[:-1]),
                   perplexity=perplexity, usage=jnp.mean((p > 0).astype(jnp.float32)))
        return z_q, aux


class VQAutoencoder(nn.Module):
    """VQ-regularised autoencoder (LDM "VQ-f4"): the KL model's encoder/decoder with a
    ``VectorQuantizer`` between ``quant_conv`` and ``post_quant_conv``.

    As in LDM, ``encode`` returns the continuous pre-quantisation latents (the diffusion model
    works there) and ``decode`` quantises before decoding; ``__call__`` -> ``(images, vq_aux)``.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 3
    num_codes: int = 8192
    beta: float = 0.25
    norm_num_groups: int = 32
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(block_out_channels=self.block_out_channels,
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  attention_implementation=self.attention_implementation,
                  query_chunk_size=self.query_chunk_size, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.encoder = Encoder(self.latent_channels, **kw)
        self.decoder = Decoder(self.out_channels, **kw)
        conv_kw = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = nn.Conv(self.latent_channels, **conv_kw)
        self.post_quant_conv = nn.Conv(self.latent_channels, **conv_kw)
        self.quantize = VectorQuantizer(self.num_codes, self.latent_channels, self.beta,
                                        param_dtype=self.param_dtype)

    def encode(self, images):
        """images -> continuous latents ``[B, h, w, latent_channels]`` (before quantisation)."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def decode(self, z):
        """Latents -> images; quantises first (so ``decode(encode(x))`` reconstructs)."""
        z_q, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images):
        z_q, aux = self.quantize(self.encode(images))
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype))).astype(jnp.float32), aux


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, as used by LDM/taming).

    conv4x4 s2 + LeakyReLU(0.2); ``n_layers - 1`` blocks of conv4x4 s2 (no bias) + BatchNorm +
    LeakyReLU with channels ``base * min(2^n, 8)``; one such block with stride 1; a final
    stride-1 conv4x4 to one logit per patch. With ``n_layers=3`` each logit sees a 70x70 patch.
    BatchNorm as in the reference (batch statistics in ``train``: pass ``mutable=["batch_stats"]``).
    """
    base_channels: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):  # [B, H, W, C] -> [B, h, w, 1] logits
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda f, s, bias: nn.Conv(f, (4, 4), strides=(s, s), padding=((1, 1), (1, 1)),
                                          use_bias=bias, **kw)
        x = nn.leaky_relu(conv(self.base_channels, 2, True)(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = conv(self.base_channels * min(2 ** n, 8), stride, False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=jnp.float32, param_dtype=self.param_dtype)(x.astype(jnp.float32))
            x = nn.leaky_relu(x.astype(self.dtype), 0.2)
        return conv(1, 1, True)(x).astype(jnp.float32)


@flax.struct.dataclass
class PointMass:
    """The identity autoencoder's "posterior": all mass on ``x`` (log-variance -inf, zero KL)."""
    mean: jax.Array

    @property
    def logvar(self):
        return jnp.full_like(self.mean, -jnp.inf)

    def sample(self, rng: jax.Array) -> jax.Array:
        del rng
        return self.mean

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        return jnp.zeros(self.mean.shape[:1], jnp.float32)


class IdentityAutoencoder(nn.Module):
    """No autoencoder (pixel-space diffusion): ``encode`` -> ``PointMass(x)``, ``decode(z) = z``."""

    def encode(self, images) -> PointMass:
        return PointMass(jnp.asarray(images, jnp.float32))

    def decode(self, z):
        return jnp.asarray(z, jnp.float32)

    def __call__(self, images, sample_posterior: bool = True):
        del sample_posterior
        posterior = self.encode(images)
        return self.decode(posterior.mean), posterior
