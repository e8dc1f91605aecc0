"""Stable Diffusion weights in and out: diffusers / transformers objects and diffusers folders.

Two ways in:

* from live PyTorch objects (needs torch): ``unet_from_diffusers(torch_unet)``,
  ``autoencoder_from_diffusers(torch_vae)``, ``text_encoder_from_transformers(torch_clip_text)``,
  each returning ``(flax_module, params)``;
* from a local diffusers-format folder (no torch, no pickle): ``load_diffusers_dir(path)`` reads
  ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``
  with ``safetensors.numpy``.

One way out: ``export_diffusers_dir(path, components)`` writes the same layout (safetensors +
config.json files, tokenizer files, a DDIM scheduler config, model_index.json) so that diffusers'
``StableDiffusionPipeline.from_pretrained(path)`` loads it (no safety checker).

The per-model config and weight mappings live in ``unet_weights``, ``vae_weights`` and
``clip_weights``; ``schedule_from_scheduler_config`` maps a diffusers scheduler config onto
``ldm_jax.diffusion.schedules.make_schedule`` and the sampler options.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from ldm_jax.interop import clip_weights, unet_weights, vae_weights
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.text_encoder import CLIPTextEncoder, make_tokenizer
from ldm_jax.models.unet import UNet
from ldm_jax.runtime.files import load_safetensors, read_json, read_safetensors_index

# The diffusers version our exports are written for (and tested against).
DIFFUSERS_VERSION = "0.42.1"

# ---------------------------------------------------------------------------------------------
# From live PyTorch objects


def _numpy_state_dict(torch_module) -> dict[str, np.ndarray]:
    import torch  # only this path needs torch

    return {k: v.detach().to(device="cpu", dtype=torch.float32).numpy()
            for k, v in torch_module.state_dict().items()}


def _with_dtype(kwargs: dict, dtype) -> dict:
    return kwargs if dtype is None else {**kwargs, "dtype": dtype}


def unet_from_diffusers(torch_unet, *, dtype=None) -> tuple[UNet, dict]:
    """A diffusers ``UNet2DConditionModel`` -> ``(UNet, params)``; ``dtype`` sets activations."""
    kwargs = unet_weights.unet_kwargs_from_config(dict(torch_unet.config))
    params = unet_weights.unet_params_from_state_dict(_numpy_state_dict(torch_unet), kwargs)
    return UNet(**_with_dtype(kwargs, dtype)), params


def autoencoder_from_diffusers(torch_vae, *, dtype=None) -> tuple[AutoencoderKL, dict]:
    """A diffusers ``AutoencoderKL`` -> ``(AutoencoderKL, params)``."""
    kwargs = vae_weights.vae_kwargs_from_config(dict(torch_vae.config))
    params = vae_weights.vae_params_from_state_dict(_numpy_state_dict(torch_vae), kwargs)
    return AutoencoderKL(**_with_dtype(kwargs, dtype)), params


def text_encoder_from_transformers(torch_text_model, *, dtype=None) -> tuple[CLIPTextEncoder, dict]:
    """A transformers ``CLIPTextModel`` -> ``(CLIPTextEncoder, params)``."""
    kwargs = clip_weights.text_encoder_kwargs_from_config(torch_text_model.config.to_dict())
    params = clip_weights.text_encoder_params_from_state_dict(
        _numpy_state_dict(torch_text_model), kwargs)
    return CLIPTextEncoder(**_with_dtype(kwargs, dtype)), params


# ---------------------------------------------------------------------------------------------
# Scheduler configs

# The diffusers scheduler config -> our schedule mapping lives with the schedulers (diffusion/);
# re-exported here, where the folder loaders use it.
from ldm_jax.diffusion.sd_scheduler_config import (  # noqa: E402, F401
    SAMPLING_KEYS, schedule_from_scheduler_config, _BETA_SCHEDULES, _PREDICTIONS, _OUR_LINEAR, _OUR_SCALED_LINEAR)


def scheduler_config_from_schedule(schedule: Mapping[str, Any]) -> dict:
    """The inverse of ``schedule_from_scheduler_config``: a diffusers ``DDIMScheduler`` config."""
    names = {v: k for k, v in _BETA_SCHEDULES.items()}
    if schedule["name"] not in names:
        raise ValueError(f"schedule name {schedule['name']!r} has no diffusers equivalent; "
                         f"allowed: {', '.join(names)}")
    predictions = {v: k for k, v in _PREDICTIONS.items()}
    prediction = schedule.get("prediction", "eps")
    if prediction not in predictions:
        raise ValueError(f"schedule prediction {prediction!r} is not one of {list(predictions)}")
    T = int(schedule["num_timesteps"])
    if schedule["name"] == "linear" and T != 1000 and schedule.get("rescale", True):
        raise ValueError("schedule rescale=True (the default of 'linear' with num_timesteps != "
                         "1000) has no diffusers equivalent; pass rescale=False")
    default = _OUR_SCALED_LINEAR if schedule["name"] == "scaled_linear" else _OUR_LINEAR
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": T, "beta_schedule": names[schedule["name"]],
        "beta_start": float(schedule.get("beta_start", default[0])),
        "beta_end": float(schedule.get("beta_end", default[1])),
        "trained_betas": None, "clip_sample": False,
        "set_alpha_to_one": True,  # our samplers end at abar = 1 (x_0 itself), as does this
        "steps_offset": int(schedule.get("steps_offset", 0)),
        "prediction_type": predictions[prediction], "thresholding": False,
        "timestep_spacing": schedule.get("spacing", "leading"),
        "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr", False)),
    }


# ---------------------------------------------------------------------------------------------
# Folders


@dataclasses.dataclass
class DiffusersComponents:
    """The models of a Stable-Diffusion-style pipeline, as Flax modules + params.

    ``schedule`` is ``schedule_from_scheduler_config``'s dict; ``scheduler_config`` the raw
    diffusers config it came from (exported as is when present). A loaded folder also records
    ``variant`` (the weights variant read, None for the plain files), ``weight_files``
    ({component: the weights file or shard index read, relative to the folder}) and ``ignored``
    ({component: class} for the model_index.json entries not loaded, e.g. the safety checker).
    """
    unet: UNet
    unet_params: dict
    vae: AutoencoderKL
    vae_params: dict
    text_encoder: CLIPTextEncoder
    text_encoder_params: dict
    tokenizer: Any
    schedule: dict
    scheduler_config: dict | None = None
    variant: str | None = None
    weight_files: dict = dataclasses.field(default_factory=dict)
    ignored: dict = dataclasses.field(default_factory=dict)


# component -> (weights file stem, config file name, accepted classes)
_COMPONENTS = {
    "unet": ("diffusion_pytorch_model", "config.json", ("UNet2DConditionModel",)),
    "vae": ("diffusion_pytorch_model", "config.json", ("AutoencoderKL",)),
    "text_encoder": ("model", "config.json", ("CLIPTextModel",)),
}


# model_index.json entries of Stable Diffusion folders that ldm_jax accepts and does not load.
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def weight_variants(folder: pathlib.Path, stem: str) -> set[str | None]:
    """The weights variants in ``folder``: None for ``{stem}.safetensors`` (or its shard index
    ``{stem}.safetensors.index.json``), "fp16" for ``{stem}.fp16.safetensors`` (or
    ``{stem}.safetensors.index.fp16.json``, as diffusers and transformers name a sharded variant's
    index; also ``{stem}.fp16.safetensors.index.json``), and so on for other variant names."""
    found: set[str | None] = set()
    if not folder.is_dir():
        return found
    patterns = (re.escape(stem) + r"\.safetensors(?:\.index\.json)?",
                re.escape(stem) + r"\.([^.]+)\.safetensors(?:\.index\.json)?",
                re.escape(stem) + r"\.safetensors\.index\.([^.]+)\.json")
    for path in folder.iterdir():
        for pattern in patterns:
            m = re.fullmatch(pattern, path.name)
            if m and not (m.groups() and _SHARD.search(m.group(1))):
                found.add(m.group(1) if m.groups() else None)
    return found


def _read_weights(folder: pathlib.Path, stem: str, variant: str | None
                  ) -> tuple[dict[str, np.ndarray], pathlib.Path]:
    """``{stem}[.{variant}].safetensors``, or the shards its index lists, as float32 arrays
    (float16 / bfloat16 weights are upcast: params are float32).

    Returns the state dict and the file it came from (the index file for shards)."""
    single = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    indexes = ([folder / f"{stem}.safetensors.index.{variant}.json",
                folder / f"{stem}.{variant}.safetensors.index.json"] if variant
               else [folder / f"{stem}.safetensors.index.json"])
    if single.is_file():
        state, source = load_safetensors(single), single
    else:
        index = next((i for i in indexes if i.is_file()), None)
        if index is None:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
            hint = (f"; found only pickle files {pickles}, which ldm_jax never loads: re-save them with "
                    "safe_serialization=True") if pickles else ""
            raise FileNotFoundError(f"missing {single} (nor a shard index {indexes[0].name}){hint}")
        state, source = read_safetensors_index(index), index
    state = {k: v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
             for k, v in state.items()}
    return state, source


def _pick_variant(root: pathlib.Path, variant: str | None) -> tuple[str | None, dict]:
    """The variant to read and {component: the variant its weights are read in}.

    An asked-for variant is read where a component has it, else its plain files (as diffusers
    falls back). Without one: the plain files, or, for a component that has none, the folder's
    only variant. Raises naming the folder and what it holds when a component has neither."""
    found = {c: weight_variants(root / c, _COMPONENTS[c][0]) for c in _COMPONENTS}
    others = sorted({v for vs in found.values() for v in vs if v is not None})
    no_plain = [c for c, vs in found.items() if vs and None not in vs]
    if variant is None and no_plain:
        if len(others) > 1:
            raise FileNotFoundError(f"{root}: {', '.join(no_plain)} hold no plain *.safetensors weights, and the "
                                    f"folder has the variants {', '.join(others)}; pass variant= one of them")
        variant = others[0]  # a folder with a single variant (e.g. only *.fp16.safetensors)
    chosen = {}
    for component, variants in found.items():
        if variant in variants:
            chosen[component] = variant
        elif None in variants:
            chosen[component] = None
        elif not variants:
            chosen[component] = variant  # _read_weights names the missing file
        else:  # only other variants (variant is set: without one, the folder's only variant is)
            raise FileNotFoundError(f"{root / component} holds the weights variants {', '.join(sorted(variants))} "
                                    f"but no variant {variant!r} (nor plain *.safetensors); pass variant= one of them")
    return variant, chosen


def _load_component(root: pathlib.Path, component: str, variant: str | None, dtype):
    folder = root / component
    if not folder.is_dir():
        raise FileNotFoundError(f"missing component folder {folder}")
    stem, config_name, _ = _COMPONENTS[component]
    config = read_json(folder / config_name)
    if component == "unet":
        to_kwargs, to_params, cls = (unet_weights.unet_kwargs_from_config,
                                     unet_weights.unet_params_from_state_dict, UNet)
    elif component == "vae":
        to_kwargs, to_params, cls = (vae_weights.vae_kwargs_from_config,
                                     vae_weights.vae_params_from_state_dict, AutoencoderKL)
    else:
        to_kwargs, to_params, cls = (clip_weights.text_encoder_kwargs_from_config,
                                     clip_weights.text_encoder_params_from_state_dict,
                                     CLIPTextEncoder)
    try:
        kwargs = to_kwargs(config)
    except ValueError as e:
        raise ValueError(f"{folder / config_name}: {e}") from None
    state_dict, weights_file = _read_weights(folder, stem, variant)
    try:
        params = to_params(state_dict, kwargs)
    except ValueError as e:
        raise ValueError(f"{weights_file} does not match {folder / config_name}: {e}") from None
    return cls(**_with_dtype(kwargs, dtype)), params, weights_file


def _check_model_index(root: pathlib.Path, index: dict) -> dict:
    """Refuse a model_index.json whose components ldm_jax cannot load; returns the ignored ones
    ({component: class}, see IGNORED_COMPONENTS)."""
    where = root / "model_index.json"
    for component, (_, _, classes) in _COMPONENTS.items():
        entry = index.get(component)
        if not entry or entry[-1] is None:
            raise ValueError(f"{where}: no {component!r} component")
        if entry[-1] not in classes:
            raise ValueError(f"{where}: {component} is a {entry[-1]}; "
                             f"supported: {', '.join(classes)}")
    tokenizer = index.get("tokenizer")
    if tokenizer and tokenizer[-1] is not None and tokenizer[-1] not in _TOKENIZER_CLASSES:
        raise ValueError(f"{where}: tokenizer is a {tokenizer[-1]}; supported: {', '.join(_TOKENIZER_CLASSES)}")
    ignored = {}
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[-1] is None:
            continue  # bookkeeping (_class_name, requires_safety_checker) and absent components
        if component in IGNORED_COMPONENTS:
            ignored[component] = entry[-1]
        elif component not in (*_COMPONENTS, "tokenizer", "scheduler"):
            raise ValueError(
                f"{where}: component {component!r} ({entry[-1]}) is not one ldm_jax loads; a Stable Diffusion "
                f"1.x / 2.x folder has unet, vae, text_encoder, tokenizer and scheduler (and may name "
                f"{', '.join(IGNORED_COMPONENTS)}, which are ignored)")
    return ignored


def load_diffusers_dir(path, *, variant: str | None = None, dtype=None) -> DiffusersComponents:
    """Read a local diffusers-format Stable Diffusion folder (torch-free, never unpickles).

    ``path`` holds ``model_index.json`` and the ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` folders (weights as ``*.safetensors``, possibly sharded
    through an ``.index.json``). ``variant="fp16"`` reads ``*.fp16.safetensors`` (a component
    without them: its plain files, as diffusers does); without ``variant``, the plain files, or
    the folder's only variant when it holds just one (``.variant`` says which was read). Weights
    stored in float16 / bfloat16 become float32 params; ``dtype`` sets the modules' activation
    dtype. model_index.json may name a safety checker, feature extractor or image encoder: they
    are not loaded (``.ignored``); any other unknown component is refused. Raises
    FileNotFoundError / ValueError naming the file that is missing, unreadable or does not match
    its config (a shard file, a tensor the shard index lists).
    """
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder {root}")
    ignored = _check_model_index(root, read_json(root / "model_index.json"))
    variant, variants = _pick_variant(root, variant)
    unet, unet_params, unet_file = _load_component(root, "unet", variants["unet"], dtype)
    vae, vae_params, vae_file = _load_component(root, "vae", variants["vae"], dtype)
    text, text_params, text_file = _load_component(root, "text_encoder", variants["text_encoder"], dtype)
    weight_files = {c: str(f.relative_to(root)) for c, f in
                    (("unet", unet_file), ("vae", vae_file), ("text_encoder", text_file))}
    if text.hidden_size != unet.cross_attention_dim:
        raise ValueError(f"{root}: text_encoder hidden_size={text.hidden_size} does not match "
                         f"unet cross_attention_dim={unet.cross_attention_dim}")

    index = read_json(root / "model_index.json")
    tok_entry = index.get("tokenizer")
    if tok_entry and tok_entry[-1] is not None:
        tok_dir = root / "tokenizer"
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"missing component folder {tok_dir}")
        from transformers import CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as e:
            raise ValueError(f"{tok_dir}: cannot build a CLIPTokenizer ({e})") from None
    else:  # no tokenizer in the folder: the CLIP vocabulary shipped with ldm_jax
        tokenizer = make_tokenizer(text.max_position_embeddings)

    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    try:
        schedule = schedule_from_scheduler_config(scheduler_config)
    except ValueError as e:
        raise ValueError(f"{root / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    return DiffusersComponents(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
                               text_encoder=text, text_encoder_params=text_params,
                               tokenizer=tokenizer, schedule=schedule,
                               scheduler_config=scheduler_config, variant=variant,
                               weight_files=weight_files, ignored=ignored)


def module_kwargs(module) -> dict:
    """The constructor arguments of a linen module (its dataclass fields, minus parent/name)."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}


def _save_safetensors(state_dict: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    # format=pt: transformers / diffusers check this metadata entry before loading.
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
              str(path), metadata={"format": "pt"})


def _write_json(obj, path: pathlib.Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(tokenizer, folder: pathlib.Path) -> None:
    """transformers' files plus vocab.json / merges.txt (what transformers 4 readers need)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    (folder / "vocab.json").write_text(json.dumps(backend["vocab"], ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")


def export_diffusers_dir(path, components: DiffusersComponents) -> pathlib.Path:
    """Write ``components`` as a diffusers ``StableDiffusionPipeline`` folder; returns the path.

    Weights are float32 safetensors (text encoder keys with transformers 4's ``text_model.``
    prefix, which transformers 4 and 5 both read). The scheduler is ``components.
    scheduler_config`` when set, else a DDIMScheduler config built from ``components.schedule``.
    The safety checker and feature extractor are left out (``requires_safety_checker: false``).
    """
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    c = components

    def write_component(name, config, state_dict, weights_file="diffusion_pytorch_model.safetensors"):
        folder = root / name
        folder.mkdir(exist_ok=True)
        _write_json(config, folder / "config.json")
        _save_safetensors(state_dict, folder / weights_file)

    unet_kwargs = module_kwargs(c.unet)
    write_component("unet", {**unet_weights.unet_config_from_kwargs(unet_kwargs), "_diffusers_version": DIFFUSERS_VERSION},
                    unet_weights.unet_state_dict_from_params(c.unet_params, unet_kwargs))
    vae_kwargs = module_kwargs(c.vae)
    write_component("vae", {**vae_weights.vae_config_from_kwargs(vae_kwargs), "_diffusers_version": DIFFUSERS_VERSION},
                    vae_weights.vae_state_dict_from_params(c.vae_params, vae_kwargs))

    text_kwargs = module_kwargs(c.text_encoder)
    text_sd = clip_weights.text_encoder_state_dict_from_params(c.text_encoder_params, text_kwargs)
    write_component("text_encoder", clip_weights.text_encoder_config_from_kwargs(text_kwargs),
                    {"text_model." + k: v for k, v in text_sd.items()}, "model.safetensors")

    tokenizer = c.tokenizer if c.tokenizer is not None else make_tokenizer(
        c.text_encoder.max_position_embeddings)
    _write_tokenizer(tokenizer, root / "tokenizer")

    scheduler_config = c.scheduler_config or scheduler_config_from_schedule(c.schedule)
    (root / "scheduler").mkdir(exist_ok=True)
    _write_json(scheduler_config, root / "scheduler" / "scheduler_config.json")

    _write_json({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "image_encoder": [None, None], "requires_safety_checker": False,
    }, root / "model_index.json")
    return root
