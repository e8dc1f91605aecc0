"""Validation of the fine-tuning groups: `lora` (adapters on a frozen pretrained model) and
`dreambooth` (prior preservation). Called by `ldm_jax.config.validate`."""
from __future__ import annotations

from ldm_jax.config.values import choice as _choice, positive_int as _positive_int, source as _source

LORA_BASES = ("diffusers:<path>",)


def check_lora(config) -> None:
    """The `lora` group: its values always; with lora.enabled, that the rest of the config fine-tunes
    a frozen pretrained model (a pretrained autoencoder and, for text, a frozen pretrained encoder)."""
    from ldm_jax.models.lora import INITS

    lo = config.lora
    if not isinstance(lo.enabled, bool):
        raise ValueError(f"lora.enabled={lo.enabled!r} must be True or False")
    _positive_int("lora.rank", lo.rank)
    if isinstance(lo.alpha, bool) or not isinstance(lo.alpha, (int, float)) or not lo.alpha > 0:
        raise ValueError(f"lora.alpha={lo.alpha!r} must be a positive number (the adapters' scale is alpha / rank)")
    if isinstance(lo.dropout, bool) or not isinstance(lo.dropout, (int, float)) or not 0.0 <= lo.dropout < 1.0:
        raise ValueError(f"lora.dropout={lo.dropout!r} must be in [0, 1)")
    _choice("lora.init", lo.init, INITS)
    if not isinstance(lo.text_encoder, bool):
        raise ValueError(f"lora.text_encoder={lo.text_encoder!r} must be True or False")
    for key in ("unet_targets", "text_encoder_targets"):
        targets = lo[key]
        if (not isinstance(targets, (tuple, list)) or not targets
                or any(not isinstance(t, str) or not t.strip() for t in targets)):
            raise ValueError(f"lora.{key}={targets!r} must be a non-empty list of module names as peft's "
                             "target_modules, e.g. ('to_q', 'to_k', 'to_v', 'to_out.0') or ('q_proj', 'v_proj')")
    if not lo.enabled:
        return
    _source("lora.base", lo.base, LORA_BASES)
    if config.unet.get("scan_layers", False):
        raise ValueError("lora.enabled=True adapts the UNet's layers one by one: set unet.scan_layers=False "
                         "(scanned layers are applied as one loop body, which the adapters cannot reach)")
    if "ldm" not in config.stages:
        raise ValueError(f"lora.enabled=True trains the diffusion stage: stages={tuple(config.stages)!r} must "
                         "include 'ldm'")
    ae = config.autoencoder
    if ae.kind != "identity" and ae.source == "train":
        raise ValueError("lora.enabled=True fine-tunes a pretrained model: autoencoder.source must be its "
                         "autoencoder ('diffusers:<path>', normally lora.base's folder), not 'train'")
    if config.conditioning.kind == "text" and config.text_encoder.train:
        raise ValueError("lora.enabled=True trains adapters only: set text_encoder.train=False (lora.text_encoder="
                         "True puts adapters on the frozen text encoder)")
    if lo.text_encoder and (config.conditioning.kind != "text" or config.text_encoder.source == "scratch"):
        raise ValueError("lora.text_encoder=True adapts a pretrained text encoder: it needs conditioning.kind='text' "
                         "and text_encoder.source='diffusers:<path>'")


def check_dreambooth(config) -> None:
    d = config.dreambooth
    w = d.prior_loss_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"dreambooth.prior_loss_weight={w!r} must be a number >= 0")
    if d.class_prompt is None:
        return
    if not isinstance(d.class_prompt, str) or not d.class_prompt.strip():
        raise ValueError(f"dreambooth.class_prompt={d.class_prompt!r} must be the class images' caption "
                         "(e.g. 'a photo of a dog'), or None for no prior preservation")
    if config.conditioning.kind != "text":
        raise ValueError(f"dreambooth.class_prompt needs conditioning.kind='text', not {config.conditioning.kind!r}")
