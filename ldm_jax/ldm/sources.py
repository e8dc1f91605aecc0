"""Where a model's weights come from: the one place that reads `autoencoder.source` and
`text_encoder.source`, and that loads a whole model from a training run (a diffusers folder's
modules come from `interop.diffusers.load_diffusers_dir`).

    params = autoencoder_params(config, workdir, mesh)     # {} | a workdir's stage 1 | a diffusers VAE
    params = text_encoder_params(config)                    # None (trained from scratch) | a diffusers CLIP
    loaded = from_workdir("runs/base")                      # Loaded(model, params, config, info)
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from ldm_jax import config as config_lib
from ldm_jax.ldm import adapters
from ldm_jax.ldm.conditioning import TextConditioning
from ldm_jax.ldm.model import LatentDiffusion
from ldm_jax.runs.workdir import check_param_shapes, load_workdir_config, restore_stage


def _folder(source: str) -> str:
    return source.split(":", 1)[1]


def autoencoder_params(config, workdir: str | None, mesh) -> dict:
    """The autoencoder parameters a run uses, from `autoencoder.source`: its own stage-1
    checkpoint in `workdir` ("train"), another workdir's ("workdir:<path>"), a diffusers folder's
    VAE ("diffusers:<path>"); {} for the identity autoencoder. Checked against the config's
    shapes; arrays replicated on `mesh`."""
    ae = config.autoencoder
    if ae.kind == "identity":
        return {}
    if ae.source.startswith("diffusers:"):
        from ldm_jax.interop import diffusers as hf

        return hf.load_diffusers_dir(_folder(ae.source)).vae_params
    where = workdir if ae.source == "train" else _folder(ae.source)
    state, _ = restore_stage(where, "autoencoder", mesh)
    params = state["params"]["autoencoder"]
    size = config.data.image_size
    module = config_lib.make_autoencoder(ae, size)
    expected = jax.eval_shape(lambda rng: module.init({"params": rng, "sample": rng}, jnp.zeros((1, size, size, 3))),
                              jax.random.PRNGKey(0))["params"]
    check_param_shapes(params, expected, f"the autoencoder checkpoint of {where}")
    return params


def trains_autoencoder(config) -> bool:
    """Whether the run's own stage 1 makes the autoencoder (else it is loaded or there is none)."""
    return config.autoencoder.kind != "identity" and config.autoencoder.source == "train"


def text_encoder_params(config) -> dict | None:
    """A frozen pretrained text encoder's parameters ("diffusers:<path>"), or None when the run
    trains its own from scratch (or is not text-conditional)."""
    if config.conditioning.kind != "text" or config.text_encoder.source == "scratch":
        return None
    if config.text_encoder.train:
        raise ValueError("text_encoder.train=True with a pretrained text_encoder.source (fine-tuning it) is not "
                         "supported yet; set text_encoder.train=False to use it frozen")
    from ldm_jax.interop import diffusers as hf

    return hf.load_diffusers_dir(_folder(config.text_encoder.source)).text_encoder_params


@dataclasses.dataclass
class Loaded:
    """A training run's model ready to sample: the object, its parameters (one dict, see
    `LatentDiffusion`), its config and what it came from (`info`: path, step, ema)."""

    model: LatentDiffusion
    params: dict
    config: object
    info: dict


def from_workdir(workdir: str, step: int | None = None, ema: bool = True, mesh=None) -> Loaded:
    """A training run's diffusion model at `step` (default: the latest checkpoint), with its EMA
    parameters (or the raw ones, `ema=False`), its autoencoder and its latent scale factor."""
    from ldm_jax.runtime import sharding

    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_workdir_config(workdir)
    try:  # a hand-edited config.json fails here, naming the key, not in a module's constructor
        config_lib.validate(config)
    except ValueError as e:
        raise ValueError(f"{os.path.join(workdir, 'config.json')}: {e}") from None
    mesh = mesh if mesh is not None else sharding.make_mesh()
    model = LatentDiffusion.from_config(config)
    state, meta = restore_stage(workdir, "ldm", mesh, step)
    if "scale_factor" not in meta:
        raise ValueError(f"workdir {workdir}: the diffusion checkpoint has no latent scale_factor in its metadata")
    trainable = state["ema_params" if ema else "params"]
    lora = adapters.from_config(config)  # a LoRA run's checkpoints hold its adapters alone
    init = model.init_params if lora is None else (lambda rng: {"lora": lora.init(model, rng)})
    expected = jax.eval_shape(init, jax.random.PRNGKey(0))
    check_param_shapes(trainable, expected, f"the diffusion checkpoint of {workdir}")
    params = {"unet": trainable["unet"] if lora is None else lora.base_unet_params(model),
              "scale": meta["scale_factor"], "autoencoder": autoencoder_params(config, workdir, mesh)}
    params.update({k: trainable[k] for k in model.conditioning.param_keys if k in trainable})
    if "process" in trainable:  # a learned schedule (VDM's gamma), trained and averaged with the UNet
        params["process"] = trainable["process"]
    if isinstance(model.conditioning, TextConditioning) and not model.conditioning.trainable:
        params["text_encoder"] = text_encoder_params(config)
    if lora is not None:  # sampled as a plain model: W + scale A B
        params = lora.merged(params, trainable["lora"])
    return Loaded(model, params, config, dict(kind="workdir", path=workdir, step=int(state["step"]), ema=bool(ema)))
