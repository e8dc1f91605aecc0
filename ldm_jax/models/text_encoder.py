"""CLIP-architecture text transformer (Flax linen); the CLIP BPE tokenizer is `ldm_jax.data.tokenizer`
(re-exported here).

``CLIPTextEncoder`` computes what transformers' ``CLIPTextModel`` computes: token + learned
position embeddings, pre-LN transformer layers with causal self-attention, a final LayerNorm, and
a pooled vector taken at the end-of-text token. Submodule names mirror transformers' module paths
(``embeddings/token_embedding``, ``encoder/layers_0/self_attn/q_proj``, ``final_layer_norm``...),
so importing a PyTorch checkpoint is a rename plus transposes (``ldm_jax/interop/clip_weights.py``).
The same module with a random init is a trainable text encoder.

"""
from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.data.tokenizer import (BOS_ID, CONTEXT_LENGTH, EOS_ID, VOCAB_FILE, VOCAB_SIZE,  # noqa: F401
                                    _bytes_to_unicode, clip_vocab_and_merges, make_tokenizer, tokenize,
                                    write_vocab_files)

Dtype = Any

# The OpenAI CLIP vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, then
# <|startoftext|> = 49406 and <|endoftext|> = 49407.


# ---------------------------------------------------------------------------------------------
# Model


def quick_gelu(x):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (transformers' ``quick_gelu``)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's default erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
}


def _layer_norm(eps, param_dtype, name):
    # LayerNorm in float32 with a two-pass variance (as PyTorch), result cast back by the caller.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def _dense(features, std, dtype, param_dtype, name):
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(std), name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):  # [B, L] int
        seq_len = ids.shape[-1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings}")
        embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype,
                                         param_dtype=self.param_dtype,
                                         embedding_init=nn.initializers.normal(0.02), name=name)
        tokens = embed(self.vocab_size, "token_embedding")(ids)  # [B, L, D]
        positions = embed(self.max_position_embeddings, "position_embedding")(
            jnp.arange(seq_len)[None])  # [1, L, D]
        return tokens + positions


class CLIPAttention(nn.Module):
    """Multi-head self-attention; softmax in float32. ``mask`` is additive, [B or 1, 1, L, L]."""
    hidden_size: int
    num_heads: int
    num_layers: int  # only for the init scale
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):  # x [B, L, D]
        d, h = self.hidden_size, self.num_heads
        if d % h:
            raise ValueError(f"hidden_size={d} is not divisible by num_attention_heads={h}")
        head_dim = d // h
        # transformers' CLIP init: in-projections d^-0.5 (2 n_layers)^-0.5, out-projection d^-0.5.
        in_std, out_std = d**-0.5 * (2 * self.num_layers) ** -0.5, d**-0.5
        proj = lambda name, std: _dense(d, std, self.dtype, self.param_dtype, name)
        split = lambda t: t.reshape(*t.shape[:-1], h, head_dim)  # [B, L, H, Dh]
        q = split(proj("q_proj", in_std)(x))
        k = split(proj("k_proj", in_std)(x))
        v = split(proj("v_proj", in_std)(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(logits + mask, axis=-1).astype(self.dtype)  # [B, H, L, L]
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:-1], d)
        return proj("out_proj", out_std)(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    num_layers: int  # only for the init scale
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.hidden_size
        x = _dense(self.intermediate_size, (2 * d) ** -0.5, self.dtype, self.param_dtype, "fc1")(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return _dense(d, d**-0.5 * (2 * self.num_layers) ** -0.5, self.dtype, self.param_dtype,
                      "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1(x)), then x + mlp(LN2(x))."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, num_layers=self.num_layers)
        ln1 = _layer_norm(self.layer_norm_eps, self.param_dtype, "layer_norm1")
        x = x + CLIPAttention(self.hidden_size, self.num_heads, name="self_attn", **kw)(
            ln1(x.astype(jnp.float32)).astype(self.dtype), mask)
        ln2 = _layer_norm(self.layer_norm_eps, self.param_dtype, "layer_norm2")
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp",
                           **kw)(ln2(x.astype(jnp.float32)).astype(self.dtype))


class CLIPEncoder(nn.Module):
    """The layer stack. Returns the output of the last layer and of layer ``num_layers - skip``."""
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, skip: int = 0):
        selected = None
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads,
                                 self.hidden_act, self.layer_norm_eps, self.num_hidden_layers,
                                 self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
            if i == self.num_hidden_layers - 1 - skip:
                selected = x
        return x, selected


class CLIPTextEncoder(nn.Module):
    """transformers ``CLIPTextModel`` in Flax. Defaults are CLIP ViT-L/14's text tower (SD 1.x).

    ``apply({"params": p}, ids)`` with ``ids`` [B, L] int (L <= max_position_embeddings) returns
    ``(last_hidden_state [B, L, D], pooled [B, D])``; pooled is the final-normed hidden state at
    the end-of-text token, chosen exactly as transformers 5 does: the first position where
    ``ids == eos_token_id``, or, for legacy configs with ``eos_token_id == 2``, ``argmax(ids)``
    (the highest id, which is <|endoftext|> in the CLIP vocabulary).
    """
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = CONTEXT_LENGTH
    hidden_act: Literal["quick_gelu", "gelu", "gelu_new"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = EOS_ID
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, attention_mask=None, *, clip_skip: int = 0,
                 final_layer_norm: bool = True):
        """Encode token ids.

        attention_mask: optional [B, L] (1 = attend, 0 = padding), combined with the causal mask
          (SD pipelines pass none: padding is masked by causality alone for the tokens before it).
        clip_skip: return the hidden states of layer ``num_hidden_layers - clip_skip`` instead of
          the last (diffusers' ``clip_skip``; 1 = penultimate layer). Static Python int.
        final_layer_norm: apply ``final_layer_norm`` to those hidden states (diffusers does, for
          SD 1.x/2.x clip-skip; SDXL's penultimate features are taken without it).
        The pooled output always comes from the full stack after the final LayerNorm, as in
        transformers.
        """
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; allowed: "
                             f"{', '.join(ACTIVATIONS)}")
        if not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {self.num_hidden_layers})")
        ids = jnp.asarray(ids, jnp.int32)
        seq_len = ids.shape[-1]
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               self.dtype, self.param_dtype, name="embeddings")(ids)

        neg = jnp.finfo(jnp.float32).min
        causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
        keep = causal[None, None]  # [1, 1, L, L]
        if attention_mask is not None:
            keep = keep & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
        mask = jnp.where(keep, 0.0, neg).astype(jnp.float32)

        last, selected = CLIPEncoder(
            self.num_hidden_layers, self.hidden_size, self.intermediate_size,
            self.num_attention_heads, self.hidden_act, self.layer_norm_eps, self.dtype,
            self.param_dtype, name="encoder")(x, mask, clip_skip)

        final_ln = _layer_norm(self.layer_norm_eps, self.param_dtype, "final_layer_norm")
        last = final_ln(last.astype(jnp.float32))  # [B, L, D] float32
        if clip_skip == 0:
            hidden = last if final_layer_norm else selected.astype(jnp.float32)
        else:
            hidden = final_ln(selected.astype(jnp.float32)) if final_layer_norm else selected

        if self.eos_token_id == 2:
            # Configs written before transformers PR #24773 carry eos_token_id=2; transformers
            # keeps taking the highest id there, and so do we.
            eos_pos = jnp.argmax(ids, axis=-1)
        else:
            eos_pos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # [B, D]
        return hidden.astype(self.dtype), pooled.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Tokenizer
