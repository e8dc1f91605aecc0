"""transformers ``CLIPTextModel`` <-> ``ldm_jax.models.text_encoder.CLIPTextEncoder``.

Torch-free: state dicts are flat ``{key: np.ndarray}`` keyed exactly like the PyTorch
``state_dict()`` of transformers 5 (``embeddings.token_embedding.weight``,
``encoder.layers.0.self_attn.q_proj.weight``, ``final_layer_norm.bias``...); configs are plain
dicts (``model.config.to_dict()`` or a folder's config.json).

Checkpoints written by transformers 4 (e.g. every Stable Diffusion ``text_encoder/`` folder) carry
a ``text_model.`` prefix and a ``embeddings.position_ids`` buffer; both are accepted on import.
The Flax tree mirrors the module tree, so the mapping is ``layers.0`` <-> ``layers_0``,
``weight`` <-> ``kernel`` (transposed) / ``scale`` / ``embedding``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.mapping import flatten, param_shapes, params_from_state_dict, state_dict_from_params

from ldm_jax.models.text_encoder import ACTIVATIONS, CLIPTextEncoder

_PREFIX = "text_model."
_BUFFERS = ("embeddings.position_ids",)  # non-persistent buffers that old checkpoints still hold

# CLIPTextConfig keys -> CLIPTextEncoder fields, with transformers' defaults.
_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, eos_token_id=49407)


def text_encoder_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """transformers ``CLIPTextConfig`` dict -> ``CLIPTextEncoder(**kwargs)``.

    Other keys (dropout, init scales, token ids other than eos, bookkeeping) have no effect on
    inference and are ignored.
    Raises ValueError naming the key for values CLIPTextEncoder does not implement.
    """
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    if c["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"text encoder config hidden_act={c['hidden_act']!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATIONS)}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"text encoder config hidden_size={c['hidden_size']} is not divisible "
                         f"by num_attention_heads={c['num_attention_heads']}")
    if c["eos_token_id"] is None:
        raise ValueError("text encoder config eos_token_id is None; the pooled output needs it")
    out = {k: (str(v) if k == "hidden_act" else float(v) if k == "layer_norm_eps" else int(v))
           for k, v in c.items()}
    return out


def text_encoder_config_from_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """``CLIPTextEncoder`` kwargs -> a transformers ``CLIPTextConfig`` dict (config.json content)."""
    fields = {**_DEFAULTS, **{k: v for k, v in kwargs.items() if k in _DEFAULTS}}
    unknown = set(kwargs) - set(_DEFAULTS) - {"dtype", "param_dtype"}
    if unknown:
        raise ValueError(f"unknown CLIPTextEncoder kwargs: {sorted(unknown)}")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            **fields, "bos_token_id": 49406, "pad_token_id": 1, "attention_dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": 512,
            "dtype": "float32"}


def text_encoder_param_shapes(kwargs: Mapping[str, Any]) -> dict:
    """Parameter shapes (``jax.ShapeDtypeStruct`` tree) of ``CLIPTextEncoder(**kwargs)``."""
    module = CLIPTextEncoder(**kwargs)
    ids = jax.ShapeDtypeStruct((1, module.max_position_embeddings), jnp.int32)
    return param_shapes(module, ids)


def _strip(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the transformers-4 ``text_model.`` prefix and the position_ids buffer."""
    if any(k.startswith(_PREFIX) for k in state_dict):
        state_dict = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v
                      for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if k not in _BUFFERS}


def text_encoder_params_from_state_dict(state_dict: Mapping[str, Any],
                                        kwargs: Mapping[str, Any]) -> dict:
    """PyTorch ``CLIPTextModel`` state dict (numpy arrays) -> Flax params (the inner dict).

    Linear weights (out, in) become kernels (in, out). Raises ValueError listing missing,
    unexpected and mis-shaped keys.
    """
    return params_from_state_dict(_strip(state_dict), text_encoder_param_shapes(kwargs), "text encoder")


def text_encoder_state_dict_from_params(params: Mapping, kwargs: Mapping[str, Any] | None = None
                                        ) -> dict[str, np.ndarray]:
    """Flax params -> ``{transformers-5 state-dict key: float32 numpy array}``.

    ``kwargs`` (optional) is checked against the parameter shapes when given.
    """
    flat = flatten(params)
    if kwargs is not None:
        expected = flatten(text_encoder_param_shapes(kwargs))
        if set(expected) != set(flat) or any(tuple(np.shape(flat[p])) != tuple(expected[p].shape)
                                             for p in flat):
            raise ValueError("text encoder params do not match CLIPTextEncoder(**kwargs)")
    return state_dict_from_params(params)
