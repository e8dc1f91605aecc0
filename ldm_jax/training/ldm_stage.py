"""Stage 2: latent diffusion with a frozen autoencoder.

The trainable parameters are {"unet", and "text_encoder" when it is trained jointly, or
"class_embedder" for class conditioning}; the frozen ones (the autoencoder, a pretrained text
encoder, the latent scale) travel as a separate `frozen` argument so they are neither optimised nor
baked into the compiled step as constants.

    step = make_train_step(config, models)      # config choices -> functions, before jit
    state, metrics = step(state, batch, frozen)  # pure; jitted once by the loop
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.data import pipeline
from ldm_jax.diffusion import losses, samplers, schedules
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_jax.models.text_encoder import CLIPTextEncoder, make_tokenizer, tokenize
from ldm_jax.models.unet import UNet
from ldm_jax.training import autoencoder_stage, optim
from ldm_jax.training import config as config_lib
from ldm_jax.training.state import TrainState, apply_gradients, merge_params, split_params


@dataclasses.dataclass(frozen=True)
class Models:
    """The stage's modules and the functions its config selects."""

    unet: UNet
    text_encoder: CLIPTextEncoder | None
    autoencoder: Any
    schedule: schedules.NoiseSchedule
    latent_shape: tuple  # (h, w, c)
    conditioning: str  # "text" | "class" | "none"
    train_text_encoder: bool
    empty_ids: np.ndarray  # [L] the tokenized empty prompt (classifier-free guidance's "unconditional")
    null_class: int


def schedule_from_config(d) -> schedules.NoiseSchedule:
    return schedules.make_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr,
                                   **dict(d.get("schedule_kwargs", {})))


def build_models(config) -> Models:
    """Modules for the UNet, the text encoder and the autoencoder, as the config says."""
    latent = config_lib.latent_shape(config)
    unet = UNet(**config_lib.unet_kwargs(config))
    unet.validate()
    kind = config.conditioning.kind
    text = None
    empty = np.zeros((0,), np.int32)
    if kind == "text":
        text = CLIPTextEncoder(**config_lib.text_encoder_kwargs(config))
        empty = tokenize(make_tokenizer(config.text_encoder.max_length), [""])[0]
    return Models(
        unet=unet, text_encoder=text,
        autoencoder=autoencoder_stage.make_autoencoder(config.autoencoder, config.data.image_size),
        schedule=schedule_from_config(config.diffusion), latent_shape=latent, conditioning=kind,
        train_text_encoder=kind == "text" and bool(config.text_encoder.train),
        empty_ids=empty, null_class=int(config.conditioning.num_classes),
    )


def make_optimizer(config):
    o = config.optim
    return optim.make_optimizer(lr=o.lr, total_steps=config.train.steps, warmup_steps=o.warmup_steps,
                                schedule=o.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                eps=o.eps, grad_clip=o.grad_clip, grad_accum=o.grad_accum)


def make_timestep_sampler(config):
    return losses.make_timestep_sampler(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)


def init_params(config, models: Models, rng) -> dict:
    """Fresh trainable parameters."""
    k_unet, k_text, k_class = jax.random.split(rng, 3)
    h, w, c = models.latent_shape
    d = models.unet.cross_attention_dim
    length = models.empty_ids.shape[0] if models.conditioning == "text" else 1
    context = jnp.zeros((1, length, d), jnp.float32)
    params = {"unet": models.unet.init(k_unet, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), context)["params"]}
    if models.train_text_encoder:
        params["text_encoder"] = models.text_encoder.init(k_text, jnp.zeros((1, length), jnp.int32))["params"]
    if models.conditioning == "class":  # LDM's ClassEmbedder: one learned context token per class (+ null)
        params["class_embedder"] = 0.02 * jax.random.normal(k_class, (models.null_class + 1, d), jnp.float32)
    return params


TOKEN_EMBEDDING = ("text_encoder", "embeddings", "token_embedding")


def frozen_paths(config, models: Models) -> tuple:
    """Trainable-parameter subtrees kept at their initial values. With
    text_encoder.train_token_embedding=False the jointly trained text encoder keeps its random
    token table ([49408, D], nearly all of its parameters, of which a small caption vocabulary uses
    a few rows) fixed: the layers above learn to read it, and the step skips its optimiser and EMA
    updates."""
    if models.train_text_encoder and not config.text_encoder.train_token_embedding:
        return (TOKEN_EMBEDDING,)
    return ()


def init_state(config, models: Models, rng) -> TrainState:
    k_params, k_run = jax.random.split(rng)
    extra = {"timesteps": make_timestep_sampler(config).init()}
    return TrainState.create(init_params(config, models, k_params), make_optimizer(config), k_run, extra=extra,
                             frozen_paths=frozen_paths(config, models), flat=autoencoder_stage.flat_update(config))


def context_fn(models: Models):
    """(params, frozen, cond [B, L] ids or [B] labels) -> context [B, L, D] for the UNet."""

    def text_context(params, frozen, ids):
        text_params = params["text_encoder"] if models.train_text_encoder else frozen["text_encoder"]
        return models.text_encoder.apply({"params": text_params}, ids)[0]

    def class_context(params, frozen, labels):
        return params["class_embedder"][labels][:, None, :]

    def no_context(params, frozen, cond):  # unconditional: one zero token for the cross-attention
        return jnp.zeros((cond.shape[0], 1, models.unet.cross_attention_dim), jnp.float32)

    return {"text": text_context, "class": class_context, "none": no_context}[models.conditioning]


def encode_latents(models: Models, frozen, images, rng):
    """z0 = scale * a sample of the frozen autoencoder's posterior (no gradient). A VQ model's
    `encode` gives its continuous pre-quantisation latents (LDM's VQ path): those, as they are."""
    latents = models.autoencoder.apply({"params": frozen["autoencoder"]}, images, method="encode")
    z = latents.sample(rng) if hasattr(latents, "sample") else latents
    return jax.lax.stop_gradient(z * frozen["scale"])


def cached_latents(models: Models, frozen, cached, rng):
    """z0 from a row of the precomputed table (`encode_split`): a sample of the KL posterior
    N(mean, exp(logvar)) from its stored moments [B, h, w, 2c] (the same draw as `encode_latents`
    makes from the images), or a VQ model's continuous latents, times the scale."""
    if isinstance(models.autoencoder, AutoencoderKL):
        z = DiagonalGaussian.from_moments(cached).sample(rng)
    else:
        z = cached
    return jax.lax.stop_gradient(z * frozen["scale"])


def _encoder_output(models: Models, ae_params, images):
    out = models.autoencoder.apply({"params": ae_params}, images, method="encode")
    return jnp.concatenate([out.mean, out.logvar], axis=-1) if isinstance(out, DiagonalGaussian) else out


CACHE_LIMIT_BYTES = 2 << 30


def encode_split(models: Models, ae_params, source, data, batch_size: int = 256) -> np.ndarray | None:
    """The frozen autoencoder's output for every record of a split, in record order, float32:
    the KL posterior's [mean, logvar] ([N, h, w, 2c]) or a VQ model's latents ([N, h, w, c]).
    None if the table would exceed CACHE_LIMIT_BYTES (the step then encodes its batch itself).
    The LDM step then draws z0 from the table: the same distribution as encoding each batch, for
    the cost of one pass over the split (no per-step encoder, no per-step image decoding)."""
    n = len(source)
    h, w, c = models.latent_shape
    width = 2 * c if isinstance(models.autoencoder, AutoencoderKL) else c
    if n * h * w * width * 4 > CACHE_LIMIT_BYTES:
        return None
    encode = jax.jit(functools.partial(_encoder_output, models))
    out = np.empty((n, h, w, width), np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size).clip(max=n - 1)  # one compiled shape: pad with the last record
        images = np.stack([pipeline.resize_and_crop(np.asarray(source[int(i)][data.image_key]), data.image_size)
                           for i in idx[: n - start]])
        images = np.concatenate([images, np.repeat(images[-1:], len(idx) - len(images), axis=0)])
        z = np.asarray(encode(ae_params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0))
        out[start:start + batch_size] = z[: n - start]
    return out


def make_train_step(config, models: Models):
    """train_step(state, batch, frozen) -> (state, metrics) for the configured objective."""
    d = config.diffusion
    loss_fn = losses.make_loss_fn(models.schedule, objective=d.objective, prediction=d.prediction,
                                  variance=d.variance, weighting=d.weighting, min_snr_gamma=d.min_snr_gamma,
                                  decoder=config_lib.likelihood_decoder(config))
    ts_sampler = make_timestep_sampler(config)
    tx = make_optimizer(config)
    get_context = context_fn(models)
    dropout_p = float(config.conditioning.caption_dropout)
    unet_dropout = models.unet.dropout > 0

    def drop_conditioning(batch, rng):
        """Classifier-free guidance training: replace the condition by the null one with prob p."""
        if models.conditioning == "text":
            ids = batch["ids"]
            keep = jax.random.bernoulli(rng, 1.0 - dropout_p, (ids.shape[0], 1))
            return jnp.where(keep, ids, jnp.asarray(models.empty_ids)[None])
        if models.conditioning == "class":
            labels = batch["label"]
            keep = jax.random.bernoulli(rng, 1.0 - dropout_p, labels.shape)
            return jnp.where(keep, labels, models.null_class)
        return jnp.zeros((batch["latents" if "latents" in batch else "image"].shape[0],), jnp.int32)

    def train_step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        k_enc, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
        if "latents" in batch:  # precomputed by encode_split
            z0 = cached_latents(models, frozen, batch["latents"], k_enc)
        else:
            z0 = encode_latents(models, frozen, batch["image"], k_enc)
        cond = drop_conditioning(batch, k_drop)
        t, weights = ts_sampler.sample(state.extra["timesteps"], k_t, z0.shape[0])
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)

        trainable, fixed = split_params(state.params, state.frozen_paths)

        def objective(trainable):
            params = merge_params(trainable, fixed)
            context = get_context(params, frozen, cond)
            rngs = {"dropout": k_dropout} if unet_dropout else {}

            def model_fn(x, tt):
                return models.unet.apply({"params": params["unet"]}, x, tt, context, train=unet_dropout, rngs=rngs)

            terms = loss_fn(model_fn, z0, t, noise)
            return jnp.mean(terms.loss * weights), terms

        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        extra = {"timesteps": ts_sampler.update(state.extra["timesteps"], t, terms.vb)}
        state, info = apply_gradients(state, grads, loss, tx, ema_decay=config.optim.ema_decay, extra=extra)
        metrics = {"loss": loss, "mse": jnp.mean(terms.mse), "vb": jnp.mean(terms.vb), **info}
        return state, metrics

    return train_step


def make_sample_fn(config, models: Models):
    """sample(params, frozen, cond, rng) -> images uint8 [B, H, W, 3] with the configured sampler
    and classifier-free guidance (one batched UNet call per step); jit it once and reuse."""
    s = config.sampler
    get_context = context_fn(models)

    def unet_fn(unet_params, x, t, context):
        return models.unet.apply({"params": unet_params}, x, t, context)

    def sample(params, frozen, cond, rng):
        batch = cond.shape[0]
        null = (jnp.broadcast_to(jnp.asarray(models.empty_ids), cond.shape) if models.conditioning == "text"
                else jnp.full_like(cond, models.null_class) if models.conditioning == "class" else cond)
        context, uncond = get_context(params, frozen, cond), get_context(params, frozen, null)
        model = samplers.classifier_free_guidance(Partial(unet_fn, params["unet"]), context, uncond,
                                                  s.guidance_scale, s.guidance_rescale)
        z = samplers.sample(model, models.schedule, (batch, *models.latent_shape), rng, sampler=s.name,
                            num_steps=s.num_steps, prediction=config.diffusion.prediction, eta=s.eta,
                            variance=config.diffusion.variance, spacing=s.spacing,
                            clip_x0=1.0 if config.autoencoder.kind == "identity" else None)  # as the pipeline
        images = models.autoencoder.apply({"params": frozen["autoencoder"]}, z / frozen["scale"], method="decode")
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return sample


def conditions_for(models: Models, prompts=None, labels=None, max_length: int | None = None) -> np.ndarray:
    """Token ids [B, L] for prompts (text models), labels [B] (class models) or zeros [B] (unconditional)."""
    if models.conditioning == "class":
        return np.asarray(labels, np.int32)
    if models.conditioning == "none":
        return np.zeros((len(prompts) if prompts is not None else len(labels),), np.int32)
    return tokenize(make_tokenizer(max_length or models.empty_ids.shape[0]), list(prompts))
