"""Stage 2: latent diffusion with a frozen autoencoder.

The model (networks, schedule, conditioning, autoencoder adapter, the loss and sampling) is
`ldm_jax.ldm.LatentDiffusion`; this module is the training recipe around it. The trainable
parameters are {"unet", and "text_encoder" when it is trained jointly, or "class_embedder" for
class conditioning}; the frozen ones (the autoencoder, a pretrained text encoder, the latent scale)
travel as a separate `frozen` argument so they are neither optimised nor baked into the compiled
step as constants.

    models = build_models(config)                # a LatentDiffusion
    step = make_train_step(config, models)       # config choices -> functions, before jit
    state, metrics = step(state, batch, frozen)  # pure; jitted once by the loop
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import optim
from ldm_jax.data import pipeline
from ldm_jax.diffusion import losses
from ldm_jax.ldm import LatentDiffusion, process_from_config, schedule_from_config  # noqa: F401 (schedule_from_config: for callers)
from ldm_jax.ldm import adapters
from ldm_jax.ldm.codecs import to_uint8
from ldm_jax.training import autoencoder_stage
from ldm_jax.training.state import TrainState, apply_gradients, merge_params, split_params

Models = LatentDiffusion  # the stage's model object (the name its callers know)


def build_models(config) -> LatentDiffusion:
    """The latent diffusion model the config describes."""
    return LatentDiffusion.from_config(config)


def optimizer_from_config(config):
    """The `optim` group's optimiser over `train.steps` steps."""
    o = config.optim
    return optim.make_optimizer(lr=o.lr, total_steps=config.train.steps, warmup_steps=o.warmup_steps,
                                schedule=o.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                                eps=o.eps, grad_clip=o.grad_clip, grad_accum=o.grad_accum, mu_dtype=o.mu_dtype)


def make_timestep_sampler(config):
    """The training times: discrete timesteps (uniform or importance-sampled), or a continuous
    process's (`losses.make_process_time_sampler`)."""
    d = config.diffusion
    process = process_from_config(d)
    if process is not None:
        return losses.make_process_time_sampler(d.timestep_sampler, process, **d.timestep_kwargs.to_dict())
    return losses.make_timestep_sampler(d.timestep_sampler, d.num_timesteps)


def init_params(config, models: Models, rng) -> dict:
    """Fresh trainable parameters (`LatentDiffusion.init_params`); with lora.enabled the adapters
    alone, {"lora": ...} (the base UNet is frozen: `adapters.LoraSetup.base_unet_params`)."""
    setup = adapters.from_config(config)
    if setup is not None:
        return {"lora": setup.init(models, rng)}
    return models.init_params(rng)


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
    return TrainState.create(init_params(config, models, k_params), optimizer_from_config(config), k_run, extra=extra,
                             frozen_paths=frozen_paths(config, models), flat=autoencoder_stage.flat_update(config))


def encode_latents(models: Models, frozen, images, rng):
    """z0 = scale * a sample of the frozen autoencoder's posterior of `images` (no gradient)."""
    return models.training_latents(frozen, {"image": images}, rng)


def cached_latents(models: Models, frozen, cached, rng):
    """z0 from rows of the precomputed table (`encode_split`): the same draw `encode_latents`
    makes from the images, times the scale."""
    return models.training_latents(frozen, {"latents": cached}, rng)


CACHE_LIMIT_BYTES = 2 << 30


def encode_split(models: Models, ae_params, source, data, batch_size: int = 256) -> np.ndarray | None:
    """The frozen autoencoder's output for every record of a split, in record order, float32:
    the KL posterior's [mean, logvar] ([N, h, w, 2c]) or a VQ model's latents ([N, h, w, c]).
    None if the table would exceed CACHE_LIMIT_BYTES (the step then encodes its batch itself).
    The LDM step then draws z0 from the table: the same distribution as encoding each batch, for
    the cost of one pass over the split (no per-step encoder, no per-step image decoding)."""
    n = len(source)
    h, w, _ = models.latent_shape
    width = models.codec.moments_channels
    if n * h * w * width * 4 > CACHE_LIMIT_BYTES:
        return None
    encode = jax.jit(models.codec.moments)
    out = np.empty((n, h, w, width), np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size).clip(max=n - 1)  # one compiled shape: pad with the last record
        images = np.stack([pipeline.resize_and_crop(np.asarray(source[int(i)][data.image_key]), data.image_size)
                           for i in idx[: n - start]])
        images = np.concatenate([images, np.repeat(images[-1:], len(idx) - len(images), axis=0)])
        z = np.asarray(encode(ae_params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0))
        out[start:start + batch_size] = z[: n - start]
    return out


def example_weights(config, models: Models):
    """DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2): weights(ids [B, L]) -> [B], giving
    dreambooth.prior_loss_weight to the examples captioned exactly dreambooth.class_prompt (the class
    images the frozen model drew, `training.dreambooth`) and 1 to the rest; None without a class
    prompt. With instance and class images drawn alike, the step's mean loss is, in expectation, half
    DreamBooth's L_instance + lambda L_prior (a constant factor)."""
    d = config.get("dreambooth")
    if d is None or d.class_prompt is None:
        return None
    class_ids = jnp.asarray(models.conditioning.conditions([d.class_prompt])[0][0])  # [L]
    prior_weight = float(d.prior_loss_weight)

    def weights(ids):
        return jnp.where(jnp.all(ids == class_ids, axis=-1), prior_weight, 1.0)

    return weights


def make_train_step(config, models: Models):
    """train_step(state, batch, frozen) -> (state, metrics) for the configured objective."""
    ts_sampler = make_timestep_sampler(config)
    tx = optimizer_from_config(config)
    dropout_p = float(config.conditioning.caption_dropout)
    unet_dropout = models.unet.dropout > 0
    lora = adapters.from_config(config)  # None: the networks train themselves
    prior = example_weights(config, models)  # None: every example weighs 1

    def train_step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        k_enc, k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 5)
        z0 = models.training_latents(frozen, batch, k_enc)
        cond = models.conditioning.drop(batch, k_drop, dropout_p)  # classifier-free guidance training
        t, weights = ts_sampler.sample(state.extra["timesteps"], k_t, z0.shape[0])
        if prior is not None:  # before caption dropout: a class image is one whatever its caption becomes
            weights = weights * prior(batch[models.conditioning.batch_key])
        noise = jax.random.normal(k_noise, z0.shape, jnp.float32)

        trainable, fixed = split_params(state.params, state.frozen_paths)

        def objective(trainable):
            params = {**merge_params(trainable, fixed), **frozen}
            with adapters.applied(lora, params, rng, train=True):
                terms = models.loss_terms(params, z0, cond, t, noise, dropout_rng=k_dropout if unet_dropout else None)
            return jnp.mean(terms.loss * weights), terms

        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        extra = {"timesteps": ts_sampler.update(state.extra["timesteps"], t, terms.vb)}
        state, info = apply_gradients(state, grads, loss, tx, ema_decay=config.optim.ema_decay, extra=extra)
        metrics = {"loss": loss, "mse": jnp.mean(terms.mse), "vb": jnp.mean(terms.vb), **info}
        return state, metrics

    return train_step


def make_sample_fn(config, models: Models):
    """sample(params, frozen, cond, rng) -> images uint8 [B, H, W, 3] with the configured sampler
    and classifier-free guidance (`LatentDiffusion.sample`, one batched UNet call per step); jit
    it once and reuse."""
    s = config.sampler
    lora = adapters.from_config(config)

    def sample(params, frozen, cond, rng):
        params = {**params, **frozen}
        with adapters.applied(lora, params):
            z = models.sample(params, cond, models.conditioning.null(cond), rng, sampler=s.name,
                              num_steps=s.num_steps, guidance=s.guidance_scale, rescale=s.guidance_rescale, eta=s.eta,
                              spacing=s.spacing)
        return to_uint8(models.decode(params, z))

    return sample


def conditions_for(models: Models, prompts=None, labels=None, max_length: int | None = None) -> np.ndarray:
    """Token ids [B, L] for prompts (text models), labels [B] (class models) or zeros [B] (unconditional)."""
    del max_length  # the model's own
    return models.conditioning.conditions(prompts if labels is None else labels)[0]
