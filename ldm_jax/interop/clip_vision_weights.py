"""transformers ``CLIPVisionModel`` / ``CLIPModel`` -> ``CLIPVisionEncoder`` / ``CLIPDualEncoder``.

Torch-free: state dicts are flat ``{key: np.ndarray}`` keyed as PyTorch's ``state_dict()``;
configs are plain dicts (``model.config.to_dict()`` or a folder's config.json).

Key layouts accepted:
  CLIPVisionModel (transformers 5)  ``embeddings.patch_embedding.weight``, ``pre_layrnorm.bias``...
  CLIPVisionModel (transformers 4)  the same under ``vision_model.``
  CLIPModel (4 and 5)               ``vision_model.*``, ``text_model.*``, ``logit_scale``,
                                    ``visual_projection.weight``, ``text_projection.weight``
Old checkpoints also hold ``embeddings.position_ids`` buffers; they are dropped. The Flax trees
mirror the module trees, so beyond that the mapping is ``ldm_jax.interop.mapping``'s renaming
(``layers.0`` <-> ``layers_0``; ``weight`` <-> transposed ``kernel`` / ``scale`` / ``embedding``;
the patch conv OIHW <-> HWIO; ``class_embedding`` and ``logit_scale`` as they are).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.clip_weights import text_encoder_kwargs_from_config
from ldm_jax.interop.mapping import params_from_state_dict, state_dict_from_params
from ldm_jax.models.clip_vision import CLIPDualEncoder, CLIPVisionEncoder
from ldm_jax.models.text_encoder import ACTIVATIONS, CLIPTextEncoder

_PREFIX = "vision_model."
_POSITION_IDS = "embeddings.position_ids"  # a non-persistent buffer that old checkpoints still hold

# CLIPVisionConfig keys -> CLIPVisionEncoder fields, with transformers' defaults (ViT-B/32).
_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _sub_config(config: Mapping[str, Any], name: str) -> dict:
    """``config[name]`` updated with the legacy ``config[name + "_dict"]``, which transformers
    lets override it (CLIP configs written by transformers 4 carry both)."""
    return {**(config.get(name) or {}), **(config.get(name + "_dict") or {})}


def _square(key: str, value) -> int:
    # transformers 5 types image_size / patch_size as int or (h, w); CLIP only uses squares.
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision config {key}={value!r}: only square sizes (an int) are "
                             "supported")
        value = value[0]
    return int(value)


def vision_encoder_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """transformers ``CLIPVisionConfig`` dict -> ``CLIPVisionEncoder(**kwargs)``.

    A whole ``CLIPConfig`` dict is accepted too (its ``vision_config`` is used). Keys that do not
    change inference (dropout, init scales, projection_dim, bookkeeping) are ignored. Raises
    ValueError naming the key for values CLIPVisionEncoder does not implement.
    """
    if "vision_config" in config or "vision_config_dict" in config:
        config = _sub_config(config, "vision_config")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    if c["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"vision config hidden_act={c['hidden_act']!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATIONS)}")
    c["image_size"] = _square("image_size", c["image_size"])
    c["patch_size"] = _square("patch_size", c["patch_size"])
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"vision config hidden_size={c['hidden_size']} is not divisible by "
                         f"num_attention_heads={c['num_attention_heads']}")
    if c["image_size"] % c["patch_size"]:
        raise ValueError(f"vision config image_size={c['image_size']} is not a multiple of "
                         f"patch_size={c['patch_size']}")
    return {k: (str(v) if k == "hidden_act" else float(v) if k == "layer_norm_eps" else int(v))
            for k, v in c.items()}


def vision_encoder_param_shapes(kwargs: Mapping[str, Any]) -> dict:
    """Parameter shapes (``jax.ShapeDtypeStruct`` tree) of ``CLIPVisionEncoder(**kwargs)``."""
    module = CLIPVisionEncoder(**kwargs)
    pixels = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, module.num_channels),
                                  jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), pixels)["params"]


def _drop_position_ids(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state_dict.items() if not k.endswith(_POSITION_IDS)}


def vision_encoder_params_from_state_dict(state_dict: Mapping[str, Any],
                                          kwargs: Mapping[str, Any]) -> dict:
    """PyTorch ``CLIPVisionModel`` (or ``CLIPModel``) state dict -> CLIPVisionEncoder params.

    When any key starts with ``vision_model.``, only those keys are used (so a whole CLIPModel
    state dict gives its vision tower). Raises ValueError listing missing, unexpected and
    mis-shaped keys.
    """
    if any(k.startswith(_PREFIX) for k in state_dict):
        state_dict = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    return params_from_state_dict(_drop_position_ids(state_dict),
                                  vision_encoder_param_shapes(kwargs), "CLIP vision encoder")


def vision_encoder_state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """CLIPVisionEncoder params -> ``{transformers-5 CLIPVisionModel key: float32 array}``."""
    return state_dict_from_params(params)


# ---------------------------------------------------------------------------------------------
# The whole CLIP model


def clip_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """transformers ``CLIPConfig`` dict -> ``{"text": CLIPTextEncoder kwargs, "vision":
    CLIPVisionEncoder kwargs, "projection_dim": int, "logit_scale_init_value": float}``
    (the arguments of ``make_clip``).

    Raises ValueError for a config without both towers (e.g. a CLIPTextModel's or
    CLIPVisionModel's config.json).
    """
    if "text_config" not in config or "vision_config" not in config:
        raise ValueError(f"a CLIPModel config (model_type 'clip') needs text_config and "
                         f"vision_config; this one has model_type={config.get('model_type')!r} "
                         f"and keys {sorted(config)[:12]}")
    return {"text": text_encoder_kwargs_from_config(_sub_config(config, "text_config")),
            "vision": vision_encoder_kwargs_from_config(_sub_config(config, "vision_config")),
            "projection_dim": int(config.get("projection_dim") or 512),
            "logit_scale_init_value": float(config.get("logit_scale_init_value", 2.6592))}


def make_clip(kwargs: Mapping[str, Any], dtype=jnp.float32) -> CLIPDualEncoder:
    """``clip_kwargs_from_config``'s dict -> ``CLIPDualEncoder`` (activations in ``dtype``)."""
    return CLIPDualEncoder(
        text_model=CLIPTextEncoder(**kwargs["text"], dtype=dtype),
        vision_model=CLIPVisionEncoder(**kwargs["vision"], dtype=dtype),
        projection_dim=kwargs["projection_dim"],
        logit_scale_init_value=kwargs["logit_scale_init_value"], dtype=dtype)


def clip_param_shapes(kwargs: Mapping[str, Any]) -> dict:
    """Parameter shapes of ``make_clip(kwargs)`` (nothing is allocated)."""
    module = make_clip(kwargs)
    vision, text = kwargs["vision"], kwargs["text"]
    pixels = jax.ShapeDtypeStruct(
        (1, vision["image_size"], vision["image_size"], vision["num_channels"]), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, text["max_position_embeddings"]), jnp.int32)
    return jax.eval_shape(lambda x, i: module.init(jax.random.PRNGKey(0), x, i),
                          pixels, ids)["params"]


def clip_params_from_state_dict(state_dict: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict:
    """PyTorch ``CLIPModel`` state dict (numpy arrays) -> ``make_clip(kwargs)`` params.

    Raises ValueError listing missing, unexpected and mis-shaped keys.
    """
    return params_from_state_dict(_drop_position_ids(state_dict), clip_param_shapes(kwargs),
                                  "CLIP model")


def clip_state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """``CLIPDualEncoder`` params -> ``{CLIPModel state-dict key: float32 array}``."""
    return state_dict_from_params(params)
