"""diffusers ``UNet2DConditionModel`` <-> ``ldm_jax.models.unet.UNet``: configs and weights.

Torch-free: state dicts are flat ``{key: np.ndarray}`` keyed exactly like the PyTorch
``state_dict()``; configs are plain dicts (``dict(model.config)`` or a folder's config.json).

The Flax parameter tree mirrors the diffusers module tree, so the weight mapping is mechanical:
``a.0.b.weight`` <-> ``a_0/b/{kernel|scale|embedding}`` with conv kernels OIHW <-> HWIO and linear
weights (out, in) <-> (in, out). The same helpers serve the autoencoder (``vae_weights``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ldm_jax.interop.mapping import flatten, param_shapes, params_from_state_dict, same, state_dict_from_params

from ldm_jax.models.unet import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, UNet

# ---------------------------------------------------------------------------------------------
# UNet configs

# diffusers config keys that must keep these values (anything else is a different architecture
# than the one UNet implements). Keys absent from the config take diffusers' defaults.
_UNET_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# config keys with no architectural meaning (or defaults-bookkeeping) that we ignore.
_UNET_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                 "addition_embed_type_num_heads",
                 # SD 2.x sets it: attention logits and softmax in float32, which ours always are
                 "upcast_attention"}
_UNET_DEFAULTS = dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, dropout=0.0,
                      norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
                      transformer_layers_per_block=1, attention_head_dim=8,
                      num_attention_heads=None, use_linear_projection=False,
                      num_class_embeds=None, sample_size=None)


def _tuple_or_int(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def unet_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """diffusers ``UNet2DConditionModel`` config -> ``UNet(**kwargs)``.

    Raises ValueError naming the key for settings UNet does not implement (SDXL additions,
    ``only_cross_attention``, a non-default time embedding...).
    """
    known = set(_UNET_FIXED) | _UNET_IGNORED | set(_UNET_DEFAULTS)
    for key in config:
        if key not in known:
            raise ValueError(f"UNet config key {key!r} is not supported")
    for key, value in _UNET_FIXED.items():
        if key in config and not same(config[key], value):
            raise ValueError(f"UNet config {key}={config[key]!r} is not supported "
                             f"(only {value!r})")
    c = {**_UNET_DEFAULTS, **{k: v for k, v in config.items() if k in _UNET_DEFAULTS}}
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        for t in c[key]:
            if t not in allowed:
                raise ValueError(f"UNet config {key} entry {t!r} is not supported "
                                 f"(allowed: {allowed})")
    cross = c["cross_attention_dim"]
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ValueError(f"UNet config cross_attention_dim={cross!r}: per-level values are "
                             "not supported")
        cross = cross[0]
    # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the SD configs
    # store the head count under the historical name attention_head_dim).
    heads = c["num_attention_heads"] or c["attention_head_dim"]
    kwargs = dict(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
        num_attention_heads=_tuple_or_int(heads), cross_attention_dim=int(cross),
        transformer_layers_per_block=_tuple_or_int(c["transformer_layers_per_block"]),
        use_linear_projection=bool(c["use_linear_projection"]),
        norm_num_groups=int(c["norm_num_groups"]), norm_eps=float(c["norm_eps"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        num_class_embeds=c["num_class_embeds"], dropout=float(c["dropout"]))
    if isinstance(c["layers_per_block"], (list, tuple)):
        raise ValueError("UNet config layers_per_block: per-level values are not supported")
    if c["sample_size"] is not None:
        kwargs["sample_size"] = int(c["sample_size"])
    UNet(**kwargs).validate()
    return kwargs


def unet_config_from_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """``UNet`` kwargs -> a config dict diffusers' ``UNet2DConditionModel.from_config`` accepts."""
    m = UNet(**kwargs)
    heads = m.num_attention_heads
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": m.sample_size, "in_channels": m.in_channels,
        "out_channels": m.out_channels, "flip_sin_to_cos": m.flip_sin_to_cos,
        "freq_shift": m.freq_shift if m.freq_shift != int(m.freq_shift) else int(m.freq_shift),
        "down_block_types": list(m.down_block_types), "up_block_types": list(m.up_block_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": list(m.block_out_channels),
        "layers_per_block": m.layers_per_block, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dropout": m.dropout, "act_fn": "silu",
        "norm_num_groups": m.norm_num_groups, "norm_eps": m.norm_eps,
        "cross_attention_dim": m.cross_attention_dim,
        "transformer_layers_per_block": (m.transformer_layers_per_block
                                         if isinstance(m.transformer_layers_per_block, int)
                                         else list(m.transformer_layers_per_block)),
        # Written under the key SD checkpoints use; diffusers reads it as the head count.
        "attention_head_dim": heads if isinstance(heads, int) else list(heads),
        "use_linear_projection": m.use_linear_projection,
        "num_class_embeds": m.num_class_embeds,
        "upcast_attention": False, "resnet_time_scale_shift": "default",
        "center_input_sample": False, "only_cross_attention": False,
        "dual_cross_attention": False, "class_embed_type": None,
    }


def _unet_expected_params(kwargs: Mapping[str, Any]) -> dict:
    m = UNet(**kwargs)
    f = 2 ** (len(m.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, m.in_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, m.cross_attention_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = (jax.ShapeDtypeStruct((1,), jnp.int32) if m.num_class_embeds is not None else None)
    return param_shapes(m, x, t, ctx, labels)


def unet_params_from_state_dict(state_dict: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict:
    """diffusers UNet state dict (numpy values) -> Flax params for ``UNet(**kwargs)``.

    Returns the inner params dict (apply with ``{"params": params}``); raises ValueError naming
    missing, unexpected or mis-shaped keys.
    """
    return params_from_state_dict(state_dict, _unet_expected_params(kwargs), "UNet")


def unet_state_dict_from_params(params: Mapping, kwargs: Mapping[str, Any]) -> dict:
    """Flax UNet params -> ``{torch_key: np.float32 array}`` with exactly diffusers' keys."""
    expected = flatten(_unet_expected_params(kwargs))
    got = flatten(params)
    if set(expected) != set(got):
        missing = sorted("/".join(p) for p in set(expected) - set(got))
        extra = sorted("/".join(p) for p in set(got) - set(expected))
        raise ValueError(f"UNet params do not match the configuration: missing {missing[:20]}, "
                         f"unexpected {extra[:20]}")
    return state_dict_from_params(params)
