"""Conditional UNet for latent diffusion, layer-for-layer compatible with diffusers'
``UNet2DConditionModel`` in its Stable Diffusion 1.x / 2.x configurations.

The parameter tree mirrors the diffusers module tree (``down_blocks_0/resnets_1/conv1/kernel``
for ``down_blocks.0.resnets.1.conv1.weight``); ``ldm_jax.interop.unet_weights`` converts both ways.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.layers import (AttentionImpl, Downsample, ResnetBlock, SpatialTransformer,
                                   TimestepEmbedding, Upsample, group_norm, scan_layers,
                                   timestep_embedding)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _runs(keys) -> list[range]:
    """The maximal runs of equal consecutive entries of `keys`, as index ranges."""
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append(range(start, i))
            start = i
    return runs


def _per_level(value, n: int, key: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"UNet: {key}={value} must be an int or have one entry per level ({n})")
    return value


class _BlockConfig(nn.Module):
    """Fields shared by the down, mid and up blocks (internal)."""
    out_channels: int
    num_layers: int
    cross_attention: bool
    heads: int
    transformer_depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    remat: bool = False
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # name=None: an unbound layer for a scanned loop body (`layers`), rematerialised there as a whole.
    def resnet(self, name=None):
        remat = self.remat and name is not None
        cls = nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock
        return cls(self.out_channels, self.norm_num_groups, self.norm_eps, self.dropout,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   **({"name": name} if name is not None else {"parent": None}))

    def transformer(self, name=None):
        cls = nn.remat(SpatialTransformer) if self.remat and name is not None else SpatialTransformer
        return cls(self.heads, self.out_channels // self.heads, depth=self.transformer_depth,
                   use_linear_projection=self.use_linear_projection,
                   norm_num_groups=self.norm_num_groups,
                   implementation=self.attention_implementation,
                   query_chunk_size=self.query_chunk_size, scan_layers=self.scan_layers,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   **({"name": name} if name is not None else {"parent": None}))

    def layers(self, x, temb, context, train, skips=None):
        """The block's `num_layers` (resnet [+ transformer]) layers, each fed one skip tensor
        (concatenated on channels, hidden first) when `skips` is given (the up blocks).
        Returns the output and each layer's output.

        With `scan_layers` (in apply), each run of consecutive layers whose inputs have the same
        shape, hence parameters of the same shapes, is one `lax.scan` (`layers.scan_layers`): XLA
        compiles one layer a run. Not with dropout in training (the unrolled layers draw their
        own masks).
        """
        n = self.num_layers
        if skips is None:
            widths = [x.shape[-1]] + [self.out_channels] * (n - 1)
        else:
            widths = [(x.shape[-1] if i == 0 else self.out_channels) + skips[i].shape[-1] for i in range(n)]
        scan = self.scan_layers and not self.is_initializing() and not (train and self.dropout > 0)
        outs = []
        for run in (_runs(widths) if scan else [range(i, i + 1) for i in range(n)]):
            if len(run) == 1:
                i = run[0]
                if skips is not None:
                    x = jnp.concatenate([x, skips[i].astype(x.dtype)], axis=-1)
                x = self.resnet(f"resnets_{i}")(x, temb, train)
                if self.cross_attention:
                    x = self.transformer(f"attentions_{i}")(x, context)
                outs.append(x)
                continue
            resnet, attention = self.resnet(), self.transformer() if self.cross_attention else None

            def layer(p, h, skip, resnet=resnet, attention=attention):
                if skip is not None:
                    h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
                h = resnet.apply({"params": p["resnets"]}, h, temb, train)
                if attention is not None:
                    h = attention.apply({"params": p["attentions"]}, h, context)
                return h, h

            names = [{"resnets": f"resnets_{i}", **({"attentions": f"attentions_{i}"} if self.cross_attention else {})}
                     for i in run]
            xs = None if skips is None else jnp.stack([skips[i] for i in run])
            x, ys = scan_layers(self, names, layer, x, xs, remat=self.remat)
            outs += [ys[k] for k in range(len(run))]
        return x, outs


class DownBlock(_BlockConfig):
    """``CrossAttnDownBlock2D`` (``cross_attention=True``) or ``DownBlock2D``; returns the output
    and the skip tensors it contributes."""
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context, train: bool = False):
        x, skips = self.layers(x, temb, context, train)
        if self.add_downsample:
            x = Downsample(self.out_channels, padding=1, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockConfig):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, x, temb, context, train: bool = False):
        x = self.resnet("resnets_0")(x, temb, train)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}")(x, temb, train)
        return x


class UpBlock(_BlockConfig):
    """``CrossAttnUpBlock2D`` or ``UpBlock2D``: each resnet eats one skip tensor (concatenated on
    channels, hidden first)."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, train: bool = False):
        x, _ = self.layers(x, temb, context, train, skips=[skips.pop() for _ in range(self.num_layers)])
        if self.add_upsample:
            x = Upsample(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="upsamplers_0")(x)
        return x


class UNet(nn.Module):
    """Text- (and optionally class-) conditional UNet, diffusers ``UNet2DConditionModel`` layout.

    Call: ``unet.apply({"params": p}, x_t, t, context, class_labels=None, train=False)`` with
    ``x_t [B, h, w, in_channels]``, ``t`` int or float ``[B]`` or scalar, ``context [B, L,
    cross_attention_dim]``; returns ``[B, h, w, out_channels]`` (``out_channels = 2 * C`` for a
    learned-variance model). Dropout needs a ``"dropout"`` rng when ``train`` and ``dropout > 0``.

    ``num_attention_heads`` is the number of heads per level (int or one per level). diffusers
    SD 1.x/2.x configs store this number under the misnamed key ``attention_head_dim``;
    ``unet_kwargs_from_config`` handles that.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    num_attention_heads: int | Sequence[int] = 8
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | Sequence[int] = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    num_class_embeds: int | None = None
    dropout: float = 0.0
    sample_size: int = 64  # nominal latent resolution (metadata for pipelines and export)
    attention_implementation: AttentionImpl = None  # None | "xla" | "cudnn"
    query_chunk_size: int | None = None  # chunked (memory-efficient) attention when set
    remat: bool = False
    # Repeated layers as lax.scan (compile once, run n times; the parameter tree is unchanged):
    # a block's runs of same-shaped (resnet, transformer) layers and a transformer's blocks.
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def validate(self):
        """Raise ValueError naming the offending field for an inconsistent configuration."""
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                    ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ValueError(f"UNet: {key} has {len(types)} entries, block_out_channels {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"UNet: {key} entry {t!r} not in {allowed}")
        heads = _per_level(self.num_attention_heads, n, "num_attention_heads")
        _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        for c, h in zip(self.block_out_channels, heads):
            if c % self.norm_num_groups:
                raise ValueError(f"UNet: block_out_channels entry {c} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
            if c % h:
                raise ValueError(f"UNet: block_out_channels entry {c} is not divisible by "
                                 f"num_attention_heads={h}")

    @nn.compact
    def __call__(self, x, t, context, class_labels=None, train: bool = False):
        self.validate()
        n = len(self.block_out_channels)
        heads = _per_level(self.num_attention_heads, n, "num_attention_heads")
        depths = _per_level(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        factor = 2 ** (n - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet: latent size {x.shape[1:3]} must be a multiple of {factor}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
                        dropout=self.dropout, use_linear_projection=self.use_linear_projection,
                        attention_implementation=self.attention_implementation,
                        query_chunk_size=self.query_chunk_size, remat=self.remat,
                        scan_layers=self.scan_layers, **kw)

        # Time (and class) embedding.
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        c0 = self.block_out_channels[0]
        temb = timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(4 * c0, name="time_embedding", **kw)(temb)
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("UNet: class_labels are required when num_class_embeds is set")
            temb = temb + nn.Embed(self.num_class_embeds, 4 * c0, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="class_embedding")(class_labels)

        x = nn.Conv(c0, (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **kw)(x.astype(self.dtype))
        context = context.astype(self.dtype)

        skips = [x]
        for i, (c, typ) in enumerate(zip(self.block_out_channels, self.down_block_types)):
            x, s = DownBlock(c, self.layers_per_block, typ == "CrossAttnDownBlock2D", heads[i],
                             depths[i], add_downsample=i < n - 1, name=f"down_blocks_{i}",
                             **block_kw)(x, temb, context, train)
            skips += s

        x = MidBlock(self.block_out_channels[-1], 1, True, heads[-1], depths[-1],
                     name="mid_block", **block_kw)(x, temb, context, train)

        rev_channels = self.block_out_channels[::-1]
        for i, (c, typ) in enumerate(zip(rev_channels, self.up_block_types)):
            level = n - 1 - i
            x = UpBlock(c, self.layers_per_block + 1, typ == "CrossAttnUpBlock2D", heads[level],
                        depths[level], add_upsample=i < n - 1, name=f"up_blocks_{i}",
                        **block_kw)(x, skips, temb, context, train)

        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype,
                                "conv_norm_out")(x))
        return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)
