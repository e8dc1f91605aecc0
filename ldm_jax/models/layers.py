"""Building blocks shared by the UNet and the autoencoder (NHWC, Flax linen).

Submodule names mirror the module paths of diffusers (``norm1``, ``conv1``, ``to_q``, ``to_out_0``,
``ff/net_0/proj``...) so that converting a PyTorch state dict is a mechanical rename plus
transposes (see ``ldm_jax/interop/unet_weights.py``).

Every module takes ``dtype`` (activations) and ``param_dtype`` (parameters). Norms and the
attention softmax run in float32 whatever ``dtype`` is.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
AttentionImpl = Literal["xla", "cudnn"] | None


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features, exactly diffusers' ``get_timestep_embedding``.

    Frequencies ``exp(-log(max_period) * i / (dim/2 - freq_shift))`` for ``i < dim/2`` (DDPM
    appendix / "Attention is all you need" sec. 3.5); output ``[sin, cos]`` or ``[cos, sin]``
    when ``flip_sin_to_cos``. ``t`` is ``[B]`` (int or float, may be fractional); returns float32
    ``[B, dim]``.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = t[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """The two-layer MLP applied to the sinusoidal features (``linear_1``, SiLU, ``linear_2``)."""
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = dense("linear_1")(x.astype(self.dtype))
        return dense("linear_2")(nn.silu(x))


def group_norm(num_groups, eps, dtype, param_dtype, name):
    # GroupNorm in float32 with a two-pass variance (as PyTorch), output cast back to `dtype`.
    # A plain function (not a wrapper module) so `scale`/`bias` sit directly under `name`.
    def apply(x):
        if x.shape[-1] % num_groups:
            raise ValueError(f"GroupNorm {name!r}: {x.shape[-1]} channels do not divide into "
                             f"norm_num_groups={num_groups} groups")
        y = nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                         param_dtype=param_dtype, use_fast_variance=False,
                         name=name)(x.astype(jnp.float32))
        return y.astype(dtype)
    return apply


def layer_norm(eps, dtype, param_dtype, name):
    def apply(x):
        y = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, name=name)(x.astype(jnp.float32))
        return y.astype(dtype)
    return apply


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              implementation: AttentionImpl = None,
              query_chunk_size: int | None = None) -> jax.Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d)) v``, over ``[B, T, N, H]`` arrays.

    Computed by ``jax.nn.dot_product_attention`` (``implementation='cudnn'`` selects cuDNN flash
    attention on GPU; ``None`` lets JAX choose). Logits and softmax are float32.

    ``query_chunk_size``: when set and shorter than the query length, the queries are processed in
    chunks of that size under ``lax.map`` with rematerialisation, so at most a
    ``[chunk, T_kv]`` block of attention weights per head exists at a time, in the forward and in
    the backward pass ("Self-attention does not need O(n^2) memory", Rabe & Staats 2021, the
    query-chunked half of it).
    """
    def full(qc):
        return jax.nn.dot_product_attention(qc, k, v, implementation=implementation)

    t = q.shape[1]
    if query_chunk_size is None or query_chunk_size >= t:
        return full(q)
    n_chunks = -(-t // query_chunk_size)
    pad = n_chunks * query_chunk_size - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    b, _, n, h = q.shape
    chunks = qp.reshape(b, n_chunks, query_chunk_size, n, h).swapaxes(0, 1)  # [C, B, c, N, H]
    out = jax.lax.map(jax.checkpoint(full), chunks)                           # [C, B, c, N, Hv]
    out = out.swapaxes(0, 1).reshape(b, n_chunks * query_chunk_size, n, v.shape[-1])
    return out[:, :t]


class Attention(nn.Module):
    """Multi-head attention (diffusers ``Attention`` as used in transformer blocks).

    Self-attention when ``context`` is None, else cross-attention on ``context [B, L, D_ctx]``.
    Parameters: ``to_q``, ``to_k``, ``to_v`` (bias ``qkv_bias``) and ``to_out_0`` (with bias).
    """
    heads: int
    dim_head: int
    qkv_bias: bool = False
    implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):  # x [B, T, C]
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda f, name, bias: nn.Dense(f, use_bias=bias, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
        split = lambda y: y.reshape(y.shape[:2] + (self.heads, self.dim_head))
        q = split(dense(inner, "to_q", self.qkv_bias)(x))
        k = split(dense(inner, "to_k", self.qkv_bias)(context))
        v = split(dense(inner, "to_v", self.qkv_bias)(context))
        o = attention(q, k, v, implementation=self.implementation,
                      query_chunk_size=self.query_chunk_size)
        o = o.reshape(o.shape[:2] + (inner,))
        return dense(x.shape[-1], "to_out_0", True)(o)


class AttentionBlock(nn.Module):
    """Spatial self-attention with residual, as in the autoencoder mid-block.

    diffusers' ``Attention(..., norm_num_groups, residual_connection=True, bias=True)`` on a 4-D
    input: GroupNorm ``group_norm``, one head of ``C`` channels by default, Linear
    ``to_q/to_k/to_v/to_out_0``, ``x + out``.
    """
    heads: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        b, hh, ww, c = x.shape
        h = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype,
                        "group_norm")(x)
        h = h.reshape(b, hh * ww, c)
        # Inline the projections (not an Attention submodule) so the parameter names sit
        # directly under this module, like diffusers' `attentions.0.to_q`.
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        split = lambda y: y.reshape(b, hh * ww, self.heads, c // self.heads)
        q, k, v = (split(dense(n)(h)) for n in ("to_q", "to_k", "to_v"))
        o = attention(q, k, v, implementation=self.implementation,
                      query_chunk_size=self.query_chunk_size).reshape(b, hh * ww, c)
        o = dense("to_out_0")(o).reshape(b, hh, ww, c)
        return (x + o).astype(self.dtype)


class GEGLU(nn.Module):
    """``proj`` to ``2*inner``; ``hidden * gelu(gate)`` (exact erf GELU) — diffusers ``GEGLU``."""
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward, ``net_0`` (GEGLU) then ``net_2`` (Linear), with 4x expansion."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = GEGLU(d * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention on ``context``, GEGLU MLP."""
    heads: int
    dim_head: int
    norm_eps: float = 1e-5
    implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # x [B, T, C], context [B, L, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.heads, self.dim_head, implementation=self.implementation,
                                      query_chunk_size=self.query_chunk_size, name=name, **kw)
        ln = lambda name: layer_norm(self.norm_eps, self.dtype, self.param_dtype, name)
        x = x + attn("attn1")(ln("norm1")(x))
        x = x + attn("attn2")(ln("norm2")(x), context.astype(self.dtype))
        x = x + FeedForward(name="ff", **kw)(ln("norm3")(x))
        return x


def scan_layers(module: nn.Module, names, fn, carry, xs=None, remat: bool = False):
    """Apply the identical layers `names` (submodules of `module`, in order) as one `lax.scan`.

    `fn(params, carry, x) -> (carry, y)` applies one layer, with `params` its parameter subtree
    (for a dict of names per layer, {key: that name's subtree}) and `x` that layer's slice of `xs`
    (a pytree stacked on a leading axis of len(names), or None); the result is (carry, the y's
    stacked), as `lax.scan`'s. The parameter tree is the unrolled layers' own: the
    subtrees are stacked for the length of the call, so checkpoints, diffusers weights and LoRA
    paths do not change; XLA compiles one layer instead of len(names). `remat` checkpoints each
    layer (as `nn.remat` does the unrolled ones). Call it in apply only: in init the layers must
    run unrolled, so that their parameters are created.
    """
    params = module.variables["params"]

    def subtree(name):
        return {k: params[n] for k, n in name.items()} if isinstance(name, dict) else params[name]

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[subtree(n) for n in names])
    step = jax.checkpoint(fn) if remat else fn
    return jax.lax.scan(lambda c, px: step(px[0], c, px[1]), carry, (stacked, xs))


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input): GroupNorm, ``proj_in``, N blocks,
    ``proj_out``, residual. Projections are 1x1 convs, or Linear when ``use_linear_projection``."""
    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    implementation: AttentionImpl = None
    query_chunk_size: int | None = None
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):  # x [B, H, W, C]
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = ((lambda f, name: nn.Dense(f, name=name, **kw)) if self.use_linear_projection else
                (lambda f, name: nn.Conv(f, (1, 1), name=name, **kw)))
        # diffusers hard-codes eps=1e-6 for this norm.
        h = group_norm(self.norm_num_groups, 1e-6, self.dtype, self.param_dtype, "norm")(x)
        h = proj(inner, "proj_in")(h).reshape(b, hh * ww, inner)
        block = lambda **where: BasicTransformerBlock(  # noqa: E731
            self.heads, self.dim_head, implementation=self.implementation,
            query_chunk_size=self.query_chunk_size, **kw, **where)
        names = [f"transformer_blocks_{i}" for i in range(self.depth)]
        if self.scan_layers and self.depth > 1 and not self.is_initializing():
            # One compiled block for all of them: the blocks' parameters (their tree unchanged)
            # are stacked on a new leading axis for the length of the call.
            body = block(parent=None)
            h, _ = scan_layers(self, names, lambda p, carry, _: (body.apply({"params": p}, carry, context), None), h)
        else:
            for name in names:
                h = block(name=name)(h, context)
        h = proj(c, "proj_out")(h.reshape(b, hh, ww, inner))
        return h + x


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` (default time-scale-shift): GroupNorm, SiLU, conv3x3, + Linear(SiLU(temb)),
    GroupNorm, SiLU, dropout, conv3x3, plus a 1x1 ``conv_shortcut`` when the channel count changes.

    ``temb=None`` (the autoencoder) leaves out the ``time_emb_proj`` layer.
    """
    out_channels: int
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, train: bool = False):  # x [B, H, W, C_in], temb [B, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gn = lambda name: group_norm(self.norm_num_groups, self.norm_eps, self.dtype,
                                      self.param_dtype, name)
        conv = lambda name: nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                                    name=name, **kw)
        h = conv("conv1")(nn.silu(gn("norm1")(x)))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb.astype(self.dtype)))
            h = h + t[:, None, None, :]
        h = nn.silu(gn("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv("conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return (x + h).astype(self.dtype)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (parameter ``conv``).

    ``padding=1`` pads symmetrically (UNet); ``padding=0`` pads one pixel on the bottom/right only,
    as diffusers' ``Downsample2D`` does for the autoencoder.
    """
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (parameter ``conv``)."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)
