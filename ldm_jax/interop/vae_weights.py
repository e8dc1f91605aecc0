"""diffusers ``AutoencoderKL`` <-> ``ldm_jax.models.autoencoder.AutoencoderKL``: configs and weights.

Torch-free, same conventions as ``unet_weights`` (flat numpy state dicts keyed like PyTorch's
``state_dict()``, plain config dicts). diffusers 0.42 stores the mid-block attention as Linear
``to_q/to_k/to_v/to_out.0`` (plus ``group_norm``), which our ``AttentionBlock`` mirrors; old
checkpoints with ``query/key/value/proj_attn`` 1x1-conv names are converted by diffusers itself
when it loads them, so export such a model through diffusers first.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ldm_jax.interop.mapping import flatten, param_shapes, params_from_state_dict, same, state_dict_from_params
from ldm_jax.models.autoencoder import AutoencoderKL

_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
_VAE_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                "force_upcast"}
_VAE_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                     up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,),
                     layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32,
                     scaling_factor=0.18215, use_quant_conv=True, use_post_quant_conv=True,
                     mid_block_add_attention=True)


def vae_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """diffusers ``AutoencoderKL`` config -> ``AutoencoderKL(**kwargs)``; ValueError naming the
    key for unsupported settings."""
    known = set(_VAE_FIXED) | _VAE_IGNORED | set(_VAE_DEFAULTS)
    for key in config:
        if key not in known:
            raise ValueError(f"AutoencoderKL config key {key!r} is not supported")
    for key, value in _VAE_FIXED.items():
        if key in config and not same(config[key], value):
            raise ValueError(f"AutoencoderKL config {key}={config[key]!r} is not supported "
                             f"(only {value!r})")
    c = {**_VAE_DEFAULTS, **{k: v for k, v in config.items() if k in _VAE_DEFAULTS}}
    n = len(c["block_out_channels"])
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
        if len(c[key]) != n or any(t != allowed for t in c[key]):
            raise ValueError(f"AutoencoderKL config {key}={c[key]!r} is not supported (only "
                             f"{allowed!r} at each of the {n} levels)")
    kwargs = dict(in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
                  block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
                  layers_per_block=int(c["layers_per_block"]),
                  latent_channels=int(c["latent_channels"]),
                  norm_num_groups=int(c["norm_num_groups"]),
                  scaling_factor=float(c["scaling_factor"]),
                  use_quant_conv=bool(c["use_quant_conv"]),
                  use_post_quant_conv=bool(c["use_post_quant_conv"]),
                  mid_block_add_attention=bool(c["mid_block_add_attention"]),
                  sample_size=int(c["sample_size"]))
    for ch in kwargs["block_out_channels"]:
        if ch % kwargs["norm_num_groups"]:
            raise ValueError(f"AutoencoderKL config block_out_channels entry {ch} is not "
                             f"divisible by norm_num_groups={kwargs['norm_num_groups']}")
    return kwargs


def vae_config_from_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """``AutoencoderKL`` kwargs -> a config dict diffusers' ``AutoencoderKL.from_config`` accepts."""
    m = AutoencoderKL(**kwargs)
    n = len(m.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": m.in_channels, "out_channels": m.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(m.block_out_channels), "layers_per_block": m.layers_per_block,
        "act_fn": "silu", "latent_channels": m.latent_channels,
        "norm_num_groups": m.norm_num_groups, "sample_size": m.sample_size,
        "scaling_factor": m.scaling_factor, "use_quant_conv": m.use_quant_conv,
        "use_post_quant_conv": m.use_post_quant_conv,
        "mid_block_add_attention": m.mid_block_add_attention,
    }


def _vae_expected_params(kwargs: Mapping[str, Any]) -> dict:
    m = AutoencoderKL(**kwargs)
    f = 2 ** (len(m.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, f, f, m.in_channels), jnp.float32)
    return param_shapes(m, x, sample_posterior=False)


def vae_params_from_state_dict(state_dict: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict:
    """diffusers ``AutoencoderKL`` state dict (numpy values) -> Flax params (inner dict);
    ValueError naming missing, unexpected or mis-shaped keys."""
    return params_from_state_dict(state_dict, _vae_expected_params(kwargs), "AutoencoderKL")


def vae_state_dict_from_params(params: Mapping, kwargs: Mapping[str, Any]) -> dict:
    """Flax ``AutoencoderKL`` params -> ``{torch_key: np.float32 array}`` (diffusers' keys)."""
    expected, got = flatten(_vae_expected_params(kwargs)), flatten(params)
    if set(expected) != set(got):
        missing = sorted("/".join(p) for p in set(expected) - set(got))
        extra = sorted("/".join(p) for p in set(got) - set(expected))
        raise ValueError(f"AutoencoderKL params do not match the configuration: missing "
                         f"{missing[:20]}, unexpected {extra[:20]}")
    return state_dict_from_params(params)
