"""Tiny random Stable Diffusion folders with the real layouts and configs (parity extra only).

    path = make_sd_folder(tmp / "sd15", "sd15", variant="fp16", shard=True)
    path, pipe = sd_folder_and_pipeline(tmp / "sd21", "sd21")   # pipe: diffusers, float32
    pipe = sd_pipeline("sd_inpaint")                            # the torch pipeline alone

Each kind copies the files of a real Hub folder -- ``runwayml/stable-diffusion-v1-5`` ("sd15"),
``stabilityai/stable-diffusion-2-1`` ("sd21"), ``runwayml/stable-diffusion-inpainting``
("sd_inpaint") -- key for key: the same ``config.json`` keys (old diffusers / transformers
versions, keys left to their defaults left out, e.g. the VAE's ``scaling_factor`` 0.18215), the
scheduler configs verbatim, the tokenizer as ``vocab.json`` + ``merges.txt`` + the two JSON files
(SD 2.x pads with "!"), and ``model_index.json`` naming the safety checker and feature extractor.
Only the widths are tiny: UNet blocks (32, 64) with one layer each and the real head counts
scaled down (SD 2.1: per-level heads, linear projections, ``upcast_attention``), 32-wide
two-layer CLIP text encoders over the real 49408-token vocabulary, a two-level VAE (16, 32) with
4 latent channels; UNet ``sample_size`` 8, so images are 16x16. SD inpainting's UNet takes 9
channels.

The weights are random (``tests.torch_random``) from ``seed``, so every call with the same
arguments writes the same bytes. The folder is written by diffusers itself
(``save_pretrained(safe_serialization=True, variant=..., max_shard_size=...)``), then its config
files are replaced by the real-key ones above (which diffusers reads back to the same modules).
A folder takes about a second to write (the torch modules are built once per kind and seed in a
process; importing torch, diffusers and transformers first takes a few seconds more).
"""
from __future__ import annotations

import copy
import functools
import json
import pathlib
from typing import Sequence

KINDS = ("sd15", "sd21", "sd_inpaint")
# extras: what model_index.json says about the components ldm_jax does not load.
#   None: what diffusers writes for a pipeline built with safety_checker=None (null entries);
#   "named": the real model_index.json (safety checker / feature extractor named), their folders
#            absent (as in a download that skipped them);
#   "present": the real model_index.json and tiny safety_checker/ and feature_extractor/ folders.
EXTRAS = (None, "named", "present")
# max_shard_size for shard=True: the UNet and the text encoder split into several files.
SHARD_SIZE = "600KB"

# The scheduler configs of the real folders, verbatim.
SCHEDULER_CONFIGS = {
    "sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None, "clip_sample": False},
    "sd21": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction",
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None},
    "sd_inpaint": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                   "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                   "steps_offset": 1, "trained_betas": None},
}

_VERSION = {"sd15": "0.6.0", "sd21": "0.10.0.dev0", "sd_inpaint": "0.6.0"}
_PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline",
                   "sd_inpaint": "StableDiffusionInpaintPipeline"}
# Variants saved in another dtype than float32, as on the Hub.
_VARIANT_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
_DOWN = ["CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D"]


def unet_config(kind: str) -> dict:
    """The real folder's ``unet/config.json`` keys at tiny width."""
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": _VERSION[kind],
              "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [32, 64],
              "center_input_sample": False, "cross_attention_dim": 32, "down_block_types": _DOWN,
              "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
              "in_channels": 9 if kind == "sd_inpaint" else 4, "layers_per_block": 1,
              "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
              "out_channels": 4, "sample_size": 8, "up_block_types": _UP}
    if kind == "sd21":  # SD 2.x: heads per level (64-wide in the real model, 16 here)
        config.update(attention_head_dim=[2, 4], dual_cross_attention=False, num_class_embeds=None,
                      only_cross_attention=False, upcast_attention=True, use_linear_projection=True)
    return config


def vae_config(kind: str) -> dict:
    """The real ``vae/config.json`` keys (no ``scaling_factor``: diffusers' default 0.18215)."""
    return {"_class_name": "AutoencoderKL", "_diffusers_version": _VERSION[kind], "act_fn": "silu",
            "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
            "out_channels": 3, "sample_size": 16, "up_block_types": ["UpDecoderBlock2D"] * 2}


def text_encoder_config(kind: str) -> dict:
    """The real ``text_encoder/config.json`` (transformers 4.2x keys, CLIP's odd token ids)."""
    sd2 = kind == "sd21"
    return {"_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder" if sd2
            else "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
            "hidden_act": "gelu" if sd2 else "quick_gelu", "hidden_size": 32,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
            "model_type": "clip_text_model", "num_attention_heads": 4, "num_hidden_layers": 2,
            "pad_token_id": 1, "projection_dim": 16 if sd2 else 32, "torch_dtype": "float32",
            "transformers_version": "4.25.0.dev0" if sd2 else "4.22.0.dev0", "vocab_size": 49408}


def _token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def tokenizer_files(kind: str) -> dict[str, dict]:
    """The real ``tokenizer/`` JSON files (besides vocab.json / merges.txt)."""
    pad = "!" if kind == "sd21" else "<|endoftext|>"
    special = {"bos_token": _token("<|startoftext|>"), "eos_token": _token("<|endoftext|>"),
               "pad_token": pad, "unk_token": _token("<|endoftext|>")}
    added = lambda t: {"__type": "AddedToken", **t}  # noqa: E731
    config = {"add_prefix_space": False, "bos_token": added(special["bos_token"]),
              "do_lower_case": True, "eos_token": added(special["eos_token"]), "errors": "replace",
              "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
              "pad_token": pad, "special_tokens_map_file": "./special_tokens_map.json",
              "tokenizer_class": "CLIPTokenizer", "unk_token": added(special["unk_token"])}
    return {"special_tokens_map.json": special, "tokenizer_config.json": config}


def model_index(kind: str, extras: str | None = "named") -> dict:
    """``model_index.json``: the real one (``extras`` "named" / "present") or diffusers' own for a
    pipeline without safety checker (None)."""
    scheduler = ["diffusers", SCHEDULER_CONFIGS[kind]["_class_name"]]
    index = {"_class_name": _PIPELINE_CLASS[kind], "_diffusers_version": _VERSION[kind],
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": scheduler, "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if kind == "sd21" and extras != "present":  # SD 2.x ships no safety checker
        index.update(requires_safety_checker=False, safety_checker=[None, None])
    if extras is None:
        index.update(_diffusers_version=_diffusers().__version__, feature_extractor=[None, None],
                     safety_checker=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    return index


def _diffusers():
    import diffusers

    return diffusers


def _check(kind, extras):
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if extras not in EXTRAS:
        raise ValueError(f"unknown extras {extras!r}; allowed: {EXTRAS}")


def _tokenizer(kind: str):
    from ldm_jax.models.text_encoder import make_tokenizer

    tokenizer = make_tokenizer(77)
    if kind == "sd21":
        tokenizer.pad_token = "!"
    return tokenizer


def _safety_parts(seed: int):
    """A tiny StableDiffusionSafetyChecker (random) and the real CLIPImageProcessor settings."""
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from tests.torch_random import randomize_torch

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    randomize_torch(checker, seed)
    extractor = transformers.CLIPImageProcessor(crop_size=32, size=32)
    return checker, extractor


@functools.lru_cache(maxsize=None)
def _built(kind: str, seed: int, safety_checker: bool):
    """The float32 torch pipeline (cached: callers get copies)."""
    import transformers

    from tests.torch_random import randomize_torch

    d = _diffusers()
    unet = d.UNet2DConditionModel.from_config(unet_config(kind))
    vae = d.AutoencoderKL.from_config(vae_config(kind))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **{k: v for k, v in text_encoder_config(kind).items()
           if k not in ("_name_or_path", "architectures", "model_type", "torch_dtype",
                        "transformers_version")}))
    for i, module in enumerate((unet, vae, text)):
        randomize_torch(module, 1000 * seed + i)
    scheduler_config = SCHEDULER_CONFIGS[kind]
    scheduler = getattr(d, scheduler_config["_class_name"]).from_config(scheduler_config)
    checker, extractor = _safety_parts(1000 * seed + 3) if safety_checker else (None, None)
    cls = getattr(d, _PIPELINE_CLASS[kind])
    return cls(vae=vae.eval(), text_encoder=text.eval(), tokenizer=_tokenizer(kind),
               unet=unet.eval(), scheduler=scheduler, safety_checker=checker,
               feature_extractor=extractor, requires_safety_checker=False)


def sd_pipeline(kind: str = "sd15", *, seed: int = 0, safety_checker: bool = False,
                variant: str | None = None):
    """The diffusers pipeline (float32, eval mode) whose weights ``make_sd_folder`` with the same
    ``kind``, ``seed`` and ``variant`` saves: for "fp16" / "bf16", rounded to that dtype (float32
    modules holding what the variant files hold). ``safety_checker``: with the tiny random safety
    checker and feature extractor that ``extras="present"`` saves. A fresh copy each call."""
    import torch

    _check(kind, None)
    pipe = copy.deepcopy(_built(kind, seed, safety_checker))
    if variant in _VARIANT_DTYPES:
        dtype = getattr(torch, _VARIANT_DTYPES[variant])
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.safety_checker):
            if module is not None:
                with torch.no_grad():
                    for p in module.parameters():
                        p.copy_(p.to(dtype).float())
    return pipe


def _write_json(obj, path: pathlib.Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def make_sd_folder(path, kind: str = "sd15", *, variant: str | None | Sequence[str | None] = None,
                   shard: bool = False, seed: int = 0, extras: str | None = "named") -> pathlib.Path:
    """Write a tiny random ``kind`` folder ("sd15" | "sd21" | "sd_inpaint") at ``path``; returns it.

    variant: None (``*.safetensors``, float32), "fp16" / "bf16" (``*.fp16.safetensors``, float16 /
    bfloat16 weights, as the Hub's variants), any other name (float32 under that name), or a
    sequence of these to write several side by side (e.g. ``(None, "fp16")``, as a full download
    has).
    shard: save with ``max_shard_size=SHARD_SIZE``: the UNet and text encoder weights become
    ``*-0000k-of-0000n.safetensors`` shards plus an ``.index.json`` (``.index.fp16.json`` for a
    variant), exactly as diffusers / transformers name them.
    extras: see ``EXTRAS`` (default: the real model_index.json, safety checker folders absent).
    """
    import torch

    _check(kind, extras)
    root = pathlib.Path(path)
    variants = [variant] if variant is None or isinstance(variant, str) else list(variant)
    base = _built(kind, seed, extras == "present")
    for v in variants:
        pipe = copy.deepcopy(base)
        if v in _VARIANT_DTYPES:
            pipe.to(getattr(torch, _VARIANT_DTYPES[v]))
        kwargs = dict(max_shard_size=SHARD_SIZE) if shard else {}
        pipe.save_pretrained(str(root), safe_serialization=True, variant=v, **kwargs)

    # The real config files in place of the ones this diffusers / transformers version writes.
    for name, config in (("unet", unet_config(kind)), ("vae", vae_config(kind)),
                         ("text_encoder", text_encoder_config(kind))):
        _write_json(config, root / name / "config.json")
    _write_json(SCHEDULER_CONFIGS[kind], root / "scheduler" / "scheduler_config.json")
    tok = root / "tokenizer"
    for f in tok.iterdir():
        f.unlink()
    from ldm_jax.data.tokenizer import write_vocab_files

    write_vocab_files(tok)
    for name, content in tokenizer_files(kind).items():
        _write_json(content, tok / name)
    _write_json(model_index(kind, extras), root / "model_index.json")
    return root


def sd_folder_and_pipeline(path, kind: str = "sd15", *, variant=None, shard: bool = False,
                           seed: int = 0, extras: str | None = "named"):
    """``(make_sd_folder(path, ...), sd_pipeline(...))``: the folder and the float32 diffusers
    pipeline holding its weights (those of its first variant when ``variant`` names several; with
    ``extras="present"`` diffusers runs the random safety checker on decoded images, which may
    black them out: compare latents, or set ``pipe.safety_checker = None``)."""
    root = make_sd_folder(path, kind, variant=variant, shard=shard, seed=seed, extras=extras)
    first = variant if variant is None or isinstance(variant, str) else list(variant)[0]
    return root, sd_pipeline(kind, seed=seed, safety_checker=extras == "present", variant=first)
