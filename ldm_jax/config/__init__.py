"""Loading and checking training configs (`configs/*.py`), and the model arguments they imply.

    config = load_config("configs/base.py", ["optim.lr=1e-4", "diffusion.schedule='cosine'"])
    validate(config)                      # before anything compiles
    unet = UNet(**unet_kwargs(config))    # in/out channels, sample size, dtype filled in

`validate` raises one ValueError naming the dotted key (`diffusion.schedule`) and, for names, the
allowed values. The schema is `configs/base.py`: every config starts from it, so a key that base
does not have is unknown. Groups that are constructor arguments (`data`, `unet`,
`text_encoder.model`, `autoencoder.model`, `autoencoder.disc`) are checked against the
dataclass / linen fields instead; `data.options` and `diffusion.schedule_kwargs` are free-form.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

from ldm_jax.data.pipeline import DataConfig
from ldm_jax.diffusion import gaussian, losses, processes, samplers, schedules, solvers
from ldm_jax.models.autoencoder import AutoencoderKL, PatchDiscriminator, VQAutoencoder
from ldm_jax.models.text_encoder import ACTIVATIONS, CLIPTextEncoder
from ldm_jax.models.unet import DOWN_BLOCK_TYPES, UNet, UP_BLOCK_TYPES
from ldm_jax.optim import LR_SCHEDULES, MU_DTYPES
from ldm_jax.runtime.files import no_bytecode
# The modules a config describes (re-exported: config.unet_kwargs(config), config.data_config(config), ...).
from ldm_jax.config.modules import (AUTOENCODER_KINDS, DTYPES, autoencoder_latent_shape,  # noqa: F401
                                    check_arguments, check_losses, compute_dtype, data_config, latent_shape,
                                    likelihood_decoder, make_autoencoder, make_discriminator, module_fields,
                                    text_encoder_kwargs, unet_kwargs, unet_out_channels)
from ldm_jax.config.fine_tuning import LORA_BASES, check_dreambooth, check_lora  # noqa: F401
from ldm_jax.config.values import choice as _choice, positive_int as _positive_int, source as _source

# configs/base.py, through a symlink inside the package: a wheel install (no checkout beside it)
# carries the schema as a regular file (setuptools copies the link's target).
BASE_CONFIG = pathlib.Path(__file__).with_name("base_config.py")

STAGES = ("autoencoder", "ldm")
AUTOENCODER_SOURCES = ("train", "workdir:<path>", "diffusers:<path>")
TEXT_ENCODER_SOURCES = ("scratch", "diffusers:<path>")
CONDITIONING_KINDS = ("text", "class", "none")  # "none": unconditional (pixel DDPM, bits/dim)

# Sub-dicts whose keys are the caller's own (builder options, schedule keywords).
FREE_FORM = ("data.options", "diffusion.schedule_kwargs", "diffusion.process_kwargs", "diffusion.timestep_kwargs")
# Checked by make_autoencoder (fields depend on autoencoder.kind).
DELEGATED = ("autoencoder.model", "autoencoder.vq")
# Constructor fields that a config must not set because another key decides them.
OWNED_ELSEWHERE = {
    "data.max_length": "text_encoder.max_length",
    "unet.dtype": "train.dtype",
    "unet.param_dtype": "nothing (parameters are float32)",
    "unet.remat": "train.remat",
    "unet.num_class_embeds": "conditioning.kind='class' (a learned context token per class)",
    "text_encoder.model.dtype": "train.dtype",
    "text_encoder.model.param_dtype": "nothing (parameters are float32)",
    "autoencoder.disc.dtype": "the autoencoder stage",
    "autoencoder.disc.param_dtype": "nothing (parameters are float32)",
}


# Groups that are constructor arguments: their keys are the class's fields.
MODEL_GROUPS = {
    "data": module_fields(DataConfig),
    "unet": module_fields(UNet),
    "text_encoder.model": module_fields(CLIPTextEncoder),
    "autoencoder.disc": module_fields(PatchDiscriminator),
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, with `overrides` ("optim.lr=1e-4") applied.

    Values are Python literals (`1e-4`, `'cosine'`, `(64, 128)`, `None`); anything that does not
    parse as one is taken as a string, so `diffusion.schedule=cosine` works too. An unknown key,
    or a value of the wrong type, raises ValueError naming it.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"ldm_jax_config_{path.stem}", path)
    if spec is None:
        raise ValueError(f"config file {str(path)!r} is not a Python file (configs/*.py define get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        with no_bytecode():  # nothing written beside the user's file
            spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"config file {str(path)!r} defines no get_config()")
        config = module.get_config()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: name it and what went wrong
        raise ValueError(f"config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config file {str(path)!r}: get_config() must return an ml_collections.ConfigDict, "
                         f"got {type(config).__name__}")
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set one "dotted.key=value" in place (see `load_config`)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form key=value")
    *parents, last = key.split(".")
    node, path = config, ""
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key(path, part, node)
        node, path = node[part], f"{path}.{part}" if path else part
    if not isinstance(node, ml_collections.ConfigDict) or (last not in node and not _settable(path, last)):
        raise _unknown_key(path, last, node)
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = text.strip()
    if isinstance(node.get(last), bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # --config.data.flip=true, as absl's boolean flags read it
    try:
        node[last] = value
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot set {key} to {value!r}: {e}") from None


def _settable(path: str, key: str) -> bool:
    """Whether an override may add `key` to the group at `path`: any key of a free-form group, a
    constructor field of a model group (e.g. unet.attention_implementation)."""
    if path in FREE_FORM:
        return True
    if path in DELEGATED:  # the fields of either autoencoder kind; make_autoencoder checks the kind's
        return key in module_fields(AutoencoderKL) | module_fields(VQAutoencoder)
    return key in MODEL_GROUPS.get(path, ()) and _join(path, key) not in OWNED_ELSEWHERE


def _unknown_key(path: str, key: str, node) -> ValueError:
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    return ValueError(f"unknown key {_join(path, key)}; {path or 'the config'} has: {', '.join(known)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.lru_cache(maxsize=1)
def reference_config() -> ml_collections.ConfigDict:
    """configs/base.py's config: the schema every other config is checked against."""
    return load_config(BASE_CONFIG)


# ---------------------------------------------------------------------------------------------
# Validation


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise one ValueError, naming the dotted key, for the first problem found in `config`:
    unknown or missing keys, unknown names (with the allowed values), shapes that cannot work
    (channels vs norm groups or heads, image and latent sizes vs downsampling, UNet channels vs
    latents and variance, context width vs the text encoder) and contradictory choices."""
    _check_keys(config, reference_config(), "")
    _check_stages(config)
    _check_data(config)
    _check_train(config)
    _check_mesh(config)
    _check_optim(config.optim, "optim")
    _check_optim(config.autoencoder.optim, "autoencoder.optim")
    _check_autoencoder(config)
    _check_text_encoder(config)
    _check_conditioning(config)
    _check_diffusion(config)
    _check_sampler(config)
    check_lora(config)
    check_dreambooth(config)
    if "ldm" in config.stages:  # the UNet is built only there; its checks use all of the above
        _check_unet(config)


def _check_keys(group, reference, path: str) -> None:
    """Keys of plain groups must be base's (all of them); constructor groups' must be fields."""
    for key in group.keys():
        sub = _join(path, key)
        if key not in reference:
            raise _unknown_key(path, key, reference)
        if sub in FREE_FORM or sub in DELEGATED:
            continue
        if sub in MODEL_GROUPS:
            _check_fields(group[key], MODEL_GROUPS[sub], sub)
        elif isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(group[key], ml_collections.ConfigDict):
                raise ValueError(f"{sub} must be a group (dict) like base's, got {group[key]!r}")
            _check_keys(group[key], reference[key], sub)
    missing = sorted(set(reference.keys()) - set(group.keys()))
    if missing:
        raise ValueError(f"config {path or 'top level'} is missing keys {[_join(path, k) for k in missing]}")


def _check_fields(group, allowed: set[str], path: str) -> None:
    for key in group.keys():
        sub = _join(path, key)
        if sub in OWNED_ELSEWHERE:
            raise ValueError(f"{sub} must not be set here: it is decided by {OWNED_ELSEWHERE[sub]}")
        if key not in allowed:
            settable = sorted(k for k in allowed if _join(path, k) not in OWNED_ELSEWHERE)
            raise ValueError(f"unknown key {sub}; allowed: {', '.join(settable)}")


def _check_stages(config) -> None:
    stages = config.stages
    if (not isinstance(stages, (tuple, list)) or not stages or len(set(stages)) != len(stages)
            or any(s not in STAGES for s in stages)):
        raise ValueError(f"stages={stages!r} must be a non-empty subset of {STAGES}")
    if "autoencoder" in stages and config.autoencoder.kind == "identity":
        raise ValueError("stages includes 'autoencoder' but autoencoder.kind='identity' has nothing "
                         "to train; use stages=('ldm',)")


def _check_data(config) -> None:
    d = config.data
    if not isinstance(d.name, str) or not d.name.strip():
        raise ValueError(f"data.name={d.name!r} must name a dataset: one of ldm_jax's "
                         f"({', '.join(_builtin_datasets())}) or a prepared TFDS dataset")
    _positive_int("data.image_size", d.image_size)
    _positive_int("data.batch_size", d.batch_size)


def _builtin_datasets():
    from ldm_jax.data.builder import BUILDERS

    return tuple(BUILDERS)


def _check_autoencoder(config) -> None:
    ae = config.autoencoder
    _choice("autoencoder.kind", ae.kind, AUTOENCODER_KINDS)
    _source("autoencoder.source", ae.source, AUTOENCODER_SOURCES)
    if ae.kind == "identity":
        return
    # Constructor fields, channels vs GroupNorm groups, image size vs downsampling (named keys).
    make_autoencoder(ae, config.data.image_size)
    if ae.kind == "vq" and ae.vq.num_codes < 2:
        raise ValueError(f"autoencoder.vq.num_codes={ae.vq.num_codes} must be at least 2")
    _positive_int("autoencoder.steps", ae.steps)
    _positive_int("autoencoder.batch_size", ae.batch_size)
    if not ae.disc_optim.lr > 0:
        raise ValueError(f"autoencoder.disc_optim.lr={ae.disc_optim.lr} must be positive")
    start = ae.disc_start
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise ValueError(f"autoencoder.disc_start={start!r} must be a step >= 0 (when the PatchGAN loss switches "
                         "on), or None for never")
    if "autoencoder" in config.stages and ae.source == "train":
        check_losses(ae)  # the LPIPS weights path and weight
    if ae.scale_factor is not None and not ae.scale_factor > 0:
        raise ValueError(f"autoencoder.scale_factor={ae.scale_factor!r} must be positive, or None "
                         "(1/std of the first latents)")


def _check_text_encoder(config) -> None:
    te = config.text_encoder
    _source("text_encoder.source", te.source, TEXT_ENCODER_SOURCES)
    m = {f: getattr(CLIPTextEncoder, f) for f in ("hidden_size", "num_attention_heads",
                                                  "max_position_embeddings", "hidden_act")}
    m.update(te.model.to_dict())
    _choice("text_encoder.model.hidden_act", m["hidden_act"], tuple(ACTIVATIONS))
    if m["hidden_size"] % m["num_attention_heads"]:
        raise ValueError(f"text_encoder.model.num_attention_heads={m['num_attention_heads']} does not "
                         f"divide text_encoder.model.hidden_size={m['hidden_size']}")
    _positive_int("text_encoder.max_length", te.max_length)
    if te.max_length > m["max_position_embeddings"]:
        raise ValueError(f"text_encoder.max_length={te.max_length} exceeds "
                         f"text_encoder.model.max_position_embeddings={m['max_position_embeddings']}")
    if te.source == "scratch" and config.conditioning.kind == "text" and not te.train:
        raise ValueError("text_encoder.train=False with text_encoder.source='scratch' would condition "
                         "on a random, frozen encoder; train it or give a pretrained source")


def _check_conditioning(config) -> None:
    c = config.conditioning
    _choice("conditioning.kind", c.kind, CONDITIONING_KINDS)
    if not 0.0 <= c.caption_dropout <= 1.0:
        raise ValueError(f"conditioning.caption_dropout={c.caption_dropout} must be in [0, 1]")
    if c.kind == "class":
        if not isinstance(c.num_classes, int) or c.num_classes < 1:
            raise ValueError(f"conditioning.num_classes={c.num_classes!r} must be positive for "
                             "conditioning.kind='class'")
        if not config.data.label_key:
            raise ValueError("conditioning.kind='class' needs data.label_key (the dataset's label feature)")
    if c.kind == "text" and not config.data.caption_key:
        raise ValueError("conditioning.kind='text' needs data.caption_key (the dataset's caption feature)")


PRECONDITIONINGS = ("none", "edm")


def _check_process(d) -> None:
    """The keys of a continuous process (diffusion.process 'flow', 'edm' or 'vdm')."""
    try:
        proc = processes.make_process(d.process, **d.process_kwargs.to_dict())
    except (ValueError, TypeError) as e:
        raise ValueError(f"diffusion.process_kwargs={d.process_kwargs.to_dict()} do not fit "
                         f"diffusion.process={d.process!r}: {e}") from None
    _choice("diffusion.objective", d.objective, losses.PROCESS_OBJECTIVES)
    _choice("diffusion.prediction", d.prediction, processes.PREDICTIONS)
    _choice("diffusion.weighting", d.weighting, losses.PROCESS_WEIGHTINGS)
    _choice("diffusion.timestep_sampler", d.timestep_sampler, losses.PROCESS_TIME_SAMPLERS)
    _choice("diffusion.preconditioning", d.preconditioning, PRECONDITIONINGS)
    if d.variance != "fixed_small":
        raise ValueError(f"diffusion.variance={d.variance!r} is the discrete schedule's; a {d.process!r} process "
                         "samples with the posterior variance: use 'fixed_small'")
    if d.zero_terminal_snr:
        raise ValueError(f"diffusion.zero_terminal_snr rescales the discrete schedule; process {d.process!r} "
                         "has its own noise levels: set it to False")
    if d.objective == "vlb" and d.process != "vdm":
        raise ValueError(f"diffusion.objective='vlb' with diffusion.process={d.process!r}: the continuous-time "
                         "bound is VDM's (process 'vdm'); flow and EDM train on 'simple' (their likelihood "
                         "comes from the probability-flow ODE)")
    if d.process == "vdm" and getattr(proc, "learned", False) and d.objective != "vlb":
        raise ValueError("diffusion.process='vdm' with a learned gamma trains it on the bound: set "
                         "diffusion.objective='vlb' (or diffusion.process_kwargs.learned=False)")
    if d.process == "flow" and d.prediction == "eps":
        raise ValueError("diffusion.prediction='eps' with diffusion.process='flow': sampling starts at t = 1, where "
                         "alpha = 0 and x0 cannot be recovered from eps; predict 'velocity' (SD3), 'v' or 'x0'")
    if d.weighting == "sd3" and d.process != "flow":
        raise ValueError(f"diffusion.weighting='sd3' (CosMap) is for diffusion.process='flow', not {d.process!r}")
    if d.preconditioning == "edm" and (d.process != "edm" or d.prediction != "x0"):
        raise ValueError("diffusion.preconditioning='edm' wraps the UNet as EDM's denoiser D(x; sigma) = c_skip x "
                         "+ c_out F(c_in x): it needs diffusion.process='edm' and diffusion.prediction='x0', not "
                         f"{d.process!r} and {d.prediction!r}")
    try:
        losses.make_process_time_sampler(d.timestep_sampler, proc, **d.timestep_kwargs.to_dict())
    except (ValueError, TypeError) as e:
        raise ValueError(f"diffusion.timestep_sampler={d.timestep_sampler!r} with diffusion.timestep_kwargs="
                         f"{d.timestep_kwargs.to_dict()}: {e}") from None


def _check_diffusion(config) -> None:
    d = config.diffusion
    _choice("diffusion.schedule", d.schedule, schedules.SCHEDULES)
    _choice("diffusion.process", d.process, processes.PROCESSES)
    if not isinstance(d.num_timesteps, int) or d.num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps={d.num_timesteps!r} must be an integer >= 2")
    if d.process != "discrete":
        _check_process(d)
        return
    for key in ("process_kwargs", "timestep_kwargs"):
        if d[key].to_dict():
            raise ValueError(f"diffusion.{key}={d[key].to_dict()} is for a continuous diffusion.process "
                             "('flow', 'edm', 'vdm'), not 'discrete'")
    if d.preconditioning != "none":
        raise ValueError(f"diffusion.preconditioning={d.preconditioning!r} needs diffusion.process='edm'")
    _choice("diffusion.objective", d.objective, losses.OBJECTIVES)
    _choice("diffusion.prediction", d.prediction, gaussian.PREDICTIONS)
    _choice("diffusion.variance", d.variance, gaussian.VARIANCES)
    _choice("diffusion.weighting", d.weighting, losses.WEIGHTINGS)
    _choice("diffusion.timestep_sampler", d.timestep_sampler, losses.TIMESTEP_SAMPLERS)
    try:
        schedules.make_schedule(d.schedule, d.num_timesteps, **d.schedule_kwargs.to_dict())
    except ValueError as e:
        raise ValueError(f"diffusion.schedule_kwargs={d.schedule_kwargs.to_dict()} do not fit "
                         f"diffusion.schedule={d.schedule!r}: {e}") from None
    if d.objective == "hybrid" and d.variance != "learned_range":
        raise ValueError(f"diffusion.objective='hybrid' trains the variance: it needs "
                         f"diffusion.variance='learned_range', not {d.variance!r}")
    if d.zero_terminal_snr and d.prediction == "eps":
        raise ValueError("diffusion.zero_terminal_snr=True with diffusion.prediction='eps': eps is "
                         "undefined at SNR 0; use prediction 'v' (Lin et al. 2023)")
    if d.timestep_sampler == "importance" and d.objective == "simple":
        raise ValueError("diffusion.timestep_sampler='importance' weighs t by the bound's terms: it "
                         "needs diffusion.objective 'vlb' or 'hybrid'")
    if d.weighting == "min_snr" and not d.min_snr_gamma > 0:
        raise ValueError(f"diffusion.min_snr_gamma={d.min_snr_gamma} must be positive")


def _check_unet(config) -> None:
    u = {f: getattr(UNet, f) for f in ("block_out_channels", "down_block_types", "up_block_types",
                                       "num_attention_heads", "transformer_layers_per_block",
                                       "norm_num_groups", "cross_attention_dim")}
    u.update(config.unet.to_dict())
    n = len(u["block_out_channels"])
    if not n or any(not isinstance(c, int) or c < 1 for c in u["block_out_channels"]):
        raise ValueError(f"unet.block_out_channels={u['block_out_channels']!r} must be positive integers")
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        if len(u[key]) != n:
            raise ValueError(f"unet.{key} has {len(u[key])} entries; unet.block_out_channels has {n}")
        for t in u[key]:
            _choice(f"unet.{key} entry", t, allowed)
    per_level = {}
    for key in ("num_attention_heads", "transformer_layers_per_block"):
        v = u[key]
        per_level[key] = (v,) * n if isinstance(v, int) else tuple(v)
        if len(per_level[key]) != n:
            raise ValueError(f"unet.{key}={v!r} must be an int or have one entry per level ({n})")
    for c, h in zip(u["block_out_channels"], per_level["num_attention_heads"]):
        if c % u["norm_num_groups"]:
            raise ValueError(f"unet.norm_num_groups={u['norm_num_groups']} does not divide "
                             f"unet.block_out_channels entry {c}")
        if c % h:
            raise ValueError(f"unet.num_attention_heads={h} does not divide unet.block_out_channels "
                             f"entry {c} (each head gets channels / heads)")

    h, w, c = latent_shape(config)
    factor = 2 ** (n - 1)
    if h % factor or w % factor:
        raise ValueError(f"unet.block_out_channels has {n} levels, downsampling by {factor}, which "
                         f"does not divide the {h}x{w} latents (data.image_size={config.data.image_size})")
    for key, want in (("in_channels", c), ("out_channels", unet_out_channels(config)), ("sample_size", h)):
        if key in config.unet and config.unet[key] != want:
            why = {"in_channels": "the latent channels",
                   "out_channels": f"the latent channels{' x 2 (learned_range variance)' if want != c else ''}",
                   "sample_size": "the latent size"}[key]
            raise ValueError(f"unet.{key}={config.unet[key]} must be {want}, {why}; or leave it out")
    if config.conditioning.kind == "text":
        hidden = config.text_encoder.model.get("hidden_size", CLIPTextEncoder.hidden_size)
        if u["cross_attention_dim"] != hidden:
            raise ValueError(f"unet.cross_attention_dim={u['cross_attention_dim']} must equal "
                             f"text_encoder.model.hidden_size={hidden} (the context width)")
    try:  # anything the model's own check knows and the above does not
        UNet(**unet_kwargs(config)).validate()
    except ValueError as e:
        raise ValueError(f"unet: {e}") from None


def _check_sampler(config) -> None:
    s = config.sampler
    _choice("sampler.name", s.name, samplers.SAMPLERS)
    if config.diffusion.process != "discrete" and s.name not in solvers.SOLVERS:
        raise ValueError(f"sampler.name={s.name!r} runs discrete schedules only; with diffusion.process="
                         f"{config.diffusion.process!r} use one of: {', '.join(solvers.SOLVERS)}")
    _choice("sampler.spacing", s.spacing, samplers.SPACINGS)
    if not isinstance(s.num_steps, int) or not 1 <= s.num_steps <= config.diffusion.num_timesteps:
        raise ValueError(f"sampler.num_steps={s.num_steps!r} must be in [1, diffusion.num_timesteps="
                         f"{config.diffusion.num_timesteps}]")
    if s.eta < 0:
        raise ValueError(f"sampler.eta={s.eta} must be >= 0")
    if s.guidance_scale < 0 or not 0.0 <= s.guidance_rescale <= 1.0:
        raise ValueError(f"sampler.guidance_scale={s.guidance_scale} must be >= 0 and "
                         f"sampler.guidance_rescale={s.guidance_rescale} in [0, 1]")
    if config.conditioning.kind == "none" and s.guidance_scale != 1.0:
        raise ValueError(f"sampler.guidance_scale={s.guidance_scale} needs a condition, but "
                         "conditioning.kind='none'; set sampler.guidance_scale=1.0")


def _check_optim(o, path: str) -> None:
    _choice(f"{path}.schedule", o.schedule, LR_SCHEDULES)
    if not o.lr > 0:
        raise ValueError(f"{path}.lr={o.lr} must be positive")
    if o.warmup_steps < 0:
        raise ValueError(f"{path}.warmup_steps={o.warmup_steps} must be >= 0")
    if "grad_accum" in o:
        _positive_int(f"{path}.grad_accum", o.grad_accum)
    if "mu_dtype" in o:
        _choice(f"{path}.mu_dtype", o.mu_dtype, MU_DTYPES)
    if "ema_decay" in o and not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"{path}.ema_decay={o.ema_decay} must be in [0, 1)")


def _check_train(config) -> None:
    t = config.train
    _choice("train.dtype", t.dtype, tuple(DTYPES))
    for key in ("steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "max_nonfinite"):
        _positive_int(f"train.{key}", t[key])


def _check_mesh(config) -> None:
    m = config.mesh
    if not isinstance(m.data, int) or not (m.data == -1 or m.data >= 1):
        raise ValueError(f"mesh.data={m.data!r} must be a positive device count, or -1 (the rest)")
    _positive_int("mesh.fsdp", m.fsdp)
