"""CLIP's vision transformer and the two-tower CLIP model (Flax linen).

``CLIPVisionEncoder`` computes what transformers' ``CLIPVisionModel`` computes (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision", sec. 2.4: a ViT
with an extra LayerNorm before the transformer): non-overlapping patches embedded by a
bias-free convolution, a learned class token prepended, learned absolute position embeddings,
``pre_layrnorm``, the pre-LN transformer layers of the text tower without a causal mask, and
``post_layernorm`` applied to the class token as the pooled output.

``CLIPDualEncoder`` joins it to ``CLIPTextEncoder`` with the two bias-free projections into the
shared embedding space and the learned temperature ``logit_scale``, as transformers' ``CLIPModel``.

Submodule names are transformers' (``embeddings/patch_embedding``, ``pre_layrnorm`` with its
typo, ``encoder/layers_0``, ``visual_projection``...), so a PyTorch state dict converts by renaming
(``ldm_jax/interop/clip_vision_weights.py``).
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.text_encoder import ACTIVATIONS, CLIPEncoder, CLIPTextEncoder

Dtype = Any


def _layer_norm(eps, param_dtype, name):
    # As the text tower: float32 with a two-pass variance (PyTorch's), cast back by the caller.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (conv, stride = kernel = patch_size, no bias), class token, positions."""
    hidden_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):  # [B, H, W, C]
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(f"pixel_values have shape [B, H, W, C] = {list(pixel_values.shape)}; "
                             f"this model takes [B, {self.image_size}, {self.image_size}, "
                             f"{self.num_channels}] (resize and crop first)")
        d, grid = self.hidden_size, self.image_size // self.patch_size
        # transformers' init: patches and positions N(0, 0.02), class token N(0, d^-0.5).
        patches = nn.Conv(d, (self.patch_size, self.patch_size), strides=self.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(0.02),
                          name="patch_embedding")(pixel_values.astype(self.dtype))  # [B, g, g, D]
        # Row-major over (row, column), the order of torch's flatten(2) on [B, D, g, g].
        patches = patches.reshape(b, grid * grid, d)
        cls = self.param("class_embedding", nn.initializers.normal(d**-0.5), (d,),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches], axis=1)
        positions = nn.Embed(grid * grid + 1, d, dtype=self.dtype, param_dtype=self.param_dtype,
                             embedding_init=nn.initializers.normal(0.02),
                             name="position_embedding")(jnp.arange(grid * grid + 1)[None])
        return x + positions  # [B, N + 1, D]


class CLIPVisionEncoder(nn.Module):
    """transformers ``CLIPVisionModel`` in Flax. Defaults are CLIP ViT-B/32's vision tower.

    ``apply({"params": p}, pixel_values)`` with ``pixel_values`` [B, image_size, image_size, C]
    float, already normalised (``ldm_jax.evaluation.clip_score.preprocess_images``), returns
    ``(last_hidden_state [B, N + 1, D], pooled [B, D])`` with N = (image_size / patch_size)^2
    patches after the class token; pooled is ``post_layernorm`` of the class token.
    """
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: Literal["quick_gelu", "gelu", "gelu_new"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; allowed: "
                             f"{', '.join(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                                 self.num_channels, self.dtype, self.param_dtype,
                                 name="embeddings")(jnp.asarray(pixel_values))
        x = _layer_norm(self.layer_norm_eps, self.param_dtype, "pre_layrnorm")(
            x.astype(jnp.float32)).astype(self.dtype)
        # Every token attends to every other: an all-zero additive mask, broadcast to [B, H, L, L].
        no_mask = jnp.zeros((1, 1, 1, 1), jnp.float32)
        last, _ = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size,
                              self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                              self.dtype, self.param_dtype, name="encoder")(x, no_mask)
        pooled = _layer_norm(self.layer_norm_eps, self.param_dtype, "post_layernorm")(
            last[:, 0].astype(jnp.float32))  # [B, D]
        return last, pooled.astype(self.dtype)


def l2_normalize(x):
    """``x / ||x||`` over the last axis, in float32 (transformers' ``_get_vector_norm``)."""
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIPDualEncoder(nn.Module):
    """transformers ``CLIPModel``: both towers, their projections and the logit scale.

    Parameter tree: ``text_model``, ``vision_model``, ``text_projection/kernel``,
    ``visual_projection/kernel`` and the scalar ``logit_scale`` t (``logits = exp(t) * cos``, the
    learned inverse temperature of CLIP fig. 3): the keys of a CLIPModel state dict.

    ``apply(v, pixel_values, ids)`` returns ``logits_per_image`` [B_images, B_texts];
    ``method="image_features"`` / ``"text_features"`` give the projected, unnormalised
    embeddings (transformers' ``get_image_features`` / ``get_text_features``).
    """
    text_model: CLIPTextEncoder
    vision_model: CLIPVisionEncoder
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        proj = lambda name, d: nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                        param_dtype=self.param_dtype,
                                        kernel_init=nn.initializers.normal(d**-0.5), name=name)
        self.visual_projection = proj("visual_projection", self.vision_model.hidden_size)
        self.text_projection = proj("text_projection", self.text_model.hidden_size)
        self.logit_scale = self.param("logit_scale",
                                      nn.initializers.constant(self.logit_scale_init_value), (),
                                      self.param_dtype)

    def image_features(self, pixel_values):
        """pixel_values [B, S, S, C] (normalised) -> projected CLS embedding [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def text_features(self, ids):
        """ids [B, L] int -> projected end-of-text embedding [B, projection_dim]."""
        return self.text_projection(self.text_model(ids)[1])

    def __call__(self, pixel_values, ids):
        image = l2_normalize(self.image_features(pixel_values))
        text = l2_normalize(self.text_features(ids))
        return jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T  # [B_img, B_txt]
