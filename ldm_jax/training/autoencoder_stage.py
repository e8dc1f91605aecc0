"""Stage 1: train the image autoencoder (LDM's first stage) and the helpers the LDM stage uses.

The loss is LDM's ``LPIPSWithDiscriminator`` / ``VQLPIPSWithDiscriminator`` without the learned
log-variance scalar (it starts at 0 and LDM's configs leave it near there):

  loss = rec + reg + [step >= disc_start] * adaptive_weight * g_loss

  rec   = mean |x - x̂| + perceptual_weight * p_loss   (L1 per pixel and channel; LDM adds the
          per-image p_loss to every element, so the mean adds the batch mean)
  p_loss = mean_b LPIPS(x_b, x̂_b), only when ``autoencoder.lpips_weights`` names a weights file
          (``ldm_jax.models.lpips``); frozen, passed to the step in ``frozen["lpips"]`` (see
          ``load_frozen``). perceptual_weight: ``autoencoder.perceptual_weight``, LDM's 1.0.
  reg   = KL:  kl_weight * mean_b KL_b / (H * W * C)   (KL_b summed over latent dims)
          VQ:  codebook + beta * commitment (the quantiser's loss; codebook weight 1 as in LDM)
  g_loss = -mean D(x̂)
  adaptive_weight = disc_weight * clip(|∇_K rec| / (|∇_K g_loss| + 1e-4), 0, 1e4), K the
          decoder's last conv kernel, treated as a constant (LDM's ``calculate_adaptive_weight``;
          rec includes the perceptual term, as LDM's nll_loss does).

KL normalisation: LDM sums the reconstruction over pixels and the KL over latent dims, both
averaged over the batch. Here the reconstruction is a per-element mean, so the KL is divided by
the same H * W * C: ``kl_weight`` (1e-6) keeps LDM's meaning. The ``kl`` metric is the per-image
KL in nats (before that division).

The PatchGAN discriminator trains in the same step on the same reconstructions with the hinge loss
``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg(x̂))))`` and its own AdamW; before
``disc_start`` neither it nor its optimiser state is touched (a ``lax.cond`` skips the work).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.config.modules import (AUTOENCODER_KINDS, as_dict, check_kind, check_losses,  # noqa: F401
                                     make_autoencoder, make_discriminator)
from ldm_jax.evaluation import shapes as shapes_eval
from ldm_jax.ldm.codecs import to_uint8  # noqa: F401 (the loop's reconstructions)
from ldm_jax.models import lpips
from ldm_jax.models.autoencoder import IdentityAutoencoder
from ldm_jax.optim import make_optimizer
from ldm_jax.training.state import TrainState, all_finite, apply_gradients

ADAPTIVE_WEIGHT_EPS = 1e-4  # LDM: ||g_rec|| / (||g_gan|| + 1e-4)
ADAPTIVE_WEIGHT_MAX = 1e4  # LDM clamps the ratio to [0, 1e4] before multiplying by disc_weight


# ---------------------------------------------------------------------------------------------
# Modules


# ---------------------------------------------------------------------------------------------
# Losses


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))``."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array, disc_weight: float) -> jax.Array:
    """LDM's ``calculate_adaptive_weight``: ``disc_weight * clip(|g_rec| / (|g_gan| + 1e-4), 0,
    1e4)`` from the two losses' gradients w.r.t. the decoder's last layer; no gradient flows."""
    ratio = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(gan_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
    return jax.lax.stop_gradient(disc_weight * jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX))


def l1_loss(images: jax.Array, recon: jax.Array) -> jax.Array:
    """Reconstruction loss: mean |x - x̂| over batch, pixels and channels."""
    return jnp.mean(jnp.abs(images.astype(jnp.float32) - recon))


def perceptual_loss(lpips_params, images: jax.Array, recon: jax.Array) -> jax.Array:
    """p_loss = mean_b LPIPS(x_b, x̂_b) with the frozen ``lpips_params`` (the module's widths
    are read from their shapes)."""
    module = lpips.LPIPS(channels=lpips.channels_of(lpips_params))
    return jnp.mean(module.apply({"params": lpips_params}, images.astype(jnp.float32), recon))


def _reconstruction_fn(ae_config) -> Callable:
    """``rec(images, recon, frozen) -> (rec_loss, metrics)``: L1, plus ``perceptual_weight *
    p_loss`` (metric ``p_loss``) when ``autoencoder.lpips_weights`` is set."""
    if ae_config["lpips_weights"] is None:
        return lambda images, recon, frozen: (l1_loss(images, recon), {})
    weight = float(ae_config.get("perceptual_weight", 1.0))

    def rec(images, recon, frozen):
        if not frozen or "lpips" not in frozen:
            raise ValueError("autoencoder.lpips_weights is set, but the step got no LPIPS "
                             "parameters: call it as step(state, batch, frozen) with frozen = "
                             "autoencoder_stage.load_frozen(config)")
        p_loss = perceptual_loss(frozen["lpips"], images, recon)
        return l1_loss(images, recon) + weight * p_loss, {"p_loss": p_loss}

    return rec


def last_layer_kernel(params) -> jax.Array:
    """The decoder's last conv kernel (the layer LDM's adaptive weight is measured on)."""
    return params["decoder"]["conv_out"]["kernel"]


def _forward_fn(module: nn.Module, kind: str, kl_weight: float) -> Callable:
    """``forward(params, images, rng) -> ((recon, reg_loss), metrics)`` for the autoencoder kind:
    the reconstruction, the regulariser's loss term and its metrics."""
    if kind == "kl":
        def forward(params, images, rng):
            recon, posterior = module.apply({"params": params}, images, rngs={"sample": rng})
            kl = jnp.mean(posterior.kl())  # nats per image, summed over latent dims
            per_image = np.prod(images.shape[1:])  # see the module docstring: LDM's normalisation
            return (recon, kl_weight * kl / per_image), {"kl": kl}
    elif kind == "vq":
        def forward(params, images, rng):
            del rng
            recon, aux = module.apply({"params": params}, images)
            return (recon, aux["loss"]), {"vq_loss": aux["loss"], "perplexity": aux["perplexity"],
                                          "codebook_usage": aux["usage"]}
    else:
        raise ValueError(f"autoencoder.kind={kind!r} has no parameters to train; allowed for "
                         "the autoencoder stage: kl, vq (skip stage 1 for 'identity')")
    return forward


# ---------------------------------------------------------------------------------------------
# State and step


@flax.struct.dataclass
class DiscriminatorState:
    """The PatchGAN discriminator's own state: its parameters, batch statistics and optimiser
    state (its AdamW, `autoencoder.disc_optim`)."""

    params: dict
    batch_stats: dict
    opt_state: object


def _disc_configured(ae_config) -> bool:
    return ae_config["disc_start"] is not None


def _optimizers(ae_config):
    """(generator tx, EMA decay, discriminator tx or None) from the autoencoder group."""
    optim = as_dict(ae_config["optim"])
    ema_decay = optim.pop("ema_decay", 0.999)
    steps = int(ae_config["steps"])
    tx = make_optimizer(**optim, total_steps=steps)
    disc_tx = None
    if _disc_configured(ae_config):
        disc_tx = make_optimizer(**as_dict(ae_config["disc_optim"]), total_steps=steps)
    return tx, ema_decay, disc_tx


def load_frozen(config) -> dict | None:
    """The stage's frozen inputs, the step's third argument: ``{"lpips": params}`` read (once)
    from ``autoencoder.lpips_weights``, or None without a perceptual loss."""
    ae = config["autoencoder"]
    check_losses(ae)
    path = ae["lpips_weights"]
    if path is None:
        return None
    try:
        return {"lpips": lpips.load_params(path)}
    except ValueError as e:
        raise ValueError(f"autoencoder.lpips_weights={path!r}: {e}") from None


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(module: nn.Module, rngs: dict, dummy: jax.Array):
    """``module.init`` compiled once per (equal) module: eager init is slower than compiling."""
    return module.init(rngs, dummy)


def init_state(config, rng: jax.Array) -> TrainState:
    """Stage-1 state: params {"autoencoder": ...}, the ``autoencoder.optim`` optimiser over
    ``autoencoder.steps`` steps, and, when ``autoencoder.disc_start`` is set, the discriminator's
    own `DiscriminatorState` (else None)."""
    ae = config["autoencoder"]
    size = int(config["data"]["image_size"])
    module = make_autoencoder(ae, size)
    check_losses(ae)
    tx, _, disc_tx = _optimizers(ae)
    init_rng, sample_rng, disc_rng, state_rng = jax.random.split(rng, 4)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = _init_variables(module, {"params": init_rng, "sample": sample_rng}, dummy)
    params = {"autoencoder": variables.get("params", {})}
    discriminator = None
    if disc_tx is not None:
        disc = make_discriminator(ae)
        disc_vars = _init_variables(disc, {"params": disc_rng}, dummy)
        discriminator = DiscriminatorState(disc_vars["params"], disc_vars["batch_stats"],
                                           disc_tx.init(disc_vars["params"]))
    return TrainState.create(params, tx, state_rng, extra={}, flat=flat_update(config),
                             discriminator=discriminator)


def flat_update(config) -> bool:
    """Update the raveled parameters (see training/state.py) unless they are sharded over fsdp."""
    return not bool(config["mesh"]["shard_params"])


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """The step's named random streams: ``fold_in(state.rng, state.step)`` split into
    {"sample"} (the posterior sample)."""
    rng = jax.random.fold_in(state.rng, state.step)
    return dict(zip(("sample",), jax.random.split(rng, 1)))


def make_train_step(config) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step(state, batch, frozen=None) -> (state, metrics)`` for stage 1 (see the module
    docstring); ``frozen`` is ``load_frozen(config)`` (the LPIPS parameters, not trained).

    Pure and un-jitted (the caller jits it once, with shardings and ``donate_argnums=0``). The
    generator update goes through ``apply_gradients``, which also receives the discriminator's
    new state and loss: a step with any non-finite loss or gradient is skipped whole.
    Metrics (scalars): loss, rec_loss (L1 + weighted p_loss), p_loss (with LPIPS only),
    kl | vq_loss, perplexity, codebook_usage, g_loss, d_loss, adaptive_weight (the last three 0
    before ``disc_start`` / without a discriminator), grad_norm, finite.
    """
    ae = config["autoencoder"]
    kind = check_kind(ae)
    module = make_autoencoder(ae, int(config["data"]["image_size"]))
    check_losses(ae)
    forward = _forward_fn(module, kind, float(ae["kl_weight"]))
    reconstruction = _reconstruction_fn(ae)
    tx, ema_decay, disc_tx = _optimizers(ae)
    disc_start, disc_weight = ae["disc_start"], float(ae["disc_weight"])
    disc = make_discriminator(ae) if disc_tx is not None else None

    def train_step(state: TrainState, batch: dict, frozen: dict | None = None):
        images = batch["image"].astype(jnp.float32)  # [B, S, S, 3] in [-1, 1]
        rngs = step_rngs(state)
        params = state.params["autoencoder"]
        # One forward with its VJP: the loss's gradient is the VJP of the cotangents on the
        # reconstruction (rec + weighted GAN term) and on the regulariser's loss (1).
        (recon, reg_loss), ae_vjp, reg_metrics = jax.vjp(
            lambda p: forward(p, images, rngs["sample"]), params, has_aux=True)
        (rec_loss, rec_metrics), rec_ct = jax.value_and_grad(
            lambda r: reconstruction(images, r, frozen), has_aux=True)(recon)
        zero = jnp.zeros((), jnp.float32)
        gan = dict(g_loss=zero, d_loss=zero, adaptive_weight=zero)
        gan_ct, discriminator, disc_finite = jnp.zeros_like(recon), state.discriminator, jnp.bool_(True)
        if disc is not None:
            gan_ct, discriminator, gan, disc_finite = _gan_terms(
                disc, disc_tx, disc_weight, images, recon, rec_ct, ae_vjp, state.discriminator,
                on=state.step >= disc_start)
        loss = rec_loss + reg_loss + gan["adaptive_weight"] * gan["g_loss"]
        (grads,) = ae_vjp((rec_ct + gan_ct, jnp.ones((), reg_loss.dtype)))
        # A non-finite discriminator loss or gradient skips the whole step, like the generator's.
        checked_loss = jnp.where(disc_finite, loss, jnp.nan)
        state, update_metrics = apply_gradients(
            state, {"autoencoder": grads}, checked_loss, tx, ema_decay=ema_decay, discriminator=discriminator)
        metrics = dict(loss=loss, rec_loss=rec_loss, **rec_metrics, **reg_metrics, **gan,
                       **update_metrics)
        return state, metrics

    return train_step


def _gan_terms(disc, disc_tx, disc_weight, images, recon, rec_ct, ae_vjp, state: DiscriminatorState, on):
    """The adversarial part of a step, run only when ``on`` (``lax.cond``): the generator's
    cotangent on x̂ (adaptive_weight * dg/dx̂), the discriminator's updated state, the metrics
    and whether the discriminator's loss and gradients are finite."""
    zero = jnp.zeros((), jnp.float32)

    def last_layer_grad(recon_ct):
        (g,) = ae_vjp((recon_ct, zero))
        return last_layer_kernel(g)

    def active(state):
        stats = state.batch_stats

        def d_apply(disc_params, batch_stats, x):
            logits, updated = disc.apply({"params": disc_params, "batch_stats": batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
            return logits, updated["batch_stats"]

        # Generator: g_loss = -mean D(x̂), D's parameters fixed; its batch-stat update is dropped.
        g_loss, g_ct = jax.value_and_grad(
            lambda r: -jnp.mean(d_apply(state.params, stats, r)[0]))(recon)
        weight = adaptive_weight(last_layer_grad(rec_ct), last_layer_grad(g_ct), disc_weight)

        # Discriminator: hinge loss on real images and this step's (detached) reconstructions.
        def d_loss_fn(disc_params):
            real, new_stats = d_apply(disc_params, stats, images)
            fake, new_stats = d_apply(disc_params, new_stats, jax.lax.stop_gradient(recon))
            return hinge_d_loss(real, fake), new_stats

        (d_loss, new_stats), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.params)
        updates, d_opt = disc_tx.update(d_grads, state.opt_state, state.params)
        new_state = DiscriminatorState(optax.apply_updates(state.params, updates), new_stats, d_opt)
        gan = dict(g_loss=g_loss, d_loss=d_loss, adaptive_weight=weight)
        return weight * g_ct, new_state, gan, all_finite(d_loss, d_grads)

    def inactive(state):
        gan = dict(g_loss=zero, d_loss=zero, adaptive_weight=zero)
        return jnp.zeros_like(recon), state, gan, jnp.bool_(True)

    return jax.lax.cond(on, active, inactive, state)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(module: nn.Module, params, images: jax.Array) -> jax.Array:
    """decode(mode of encode(images)): the deterministic reconstruction, float32 [B, S, S, 3]."""
    latents = module.apply({"params": params}, images, method="encode")
    z = latents.mode() if hasattr(latents, "mode") else latents  # VQ: continuous latents
    return module.apply({"params": params}, z, method="decode")


def reconstruction_accuracy(module: nn.Module, params, images_uint8, captions,
                            batch_size: int) -> dict[str, float]:
    """The shapes checker's accuracy dict ({colour_ok, shape_ok, position_ok, ok}) on the
    reconstructions of ``images_uint8`` [N, S, S, 3]: how many keep the captioned shape.
    Batches are padded to ``batch_size`` so one compiled ``reconstruct`` serves them all."""
    images_uint8 = np.asarray(images_uint8)
    recons = []
    for start in range(0, len(images_uint8), batch_size):
        chunk = images_uint8[start:start + batch_size]
        x = chunk.astype(np.float32) / 127.5 - 1.0
        pad = batch_size - len(x)
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
        recons.append(to_uint8(reconstruct(module, params, jnp.asarray(x)))[:len(chunk)])
    return shapes_eval.accuracy(np.concatenate(recons), list(captions))


def estimate_scale_factor(module: nn.Module, params, images: jax.Array, rng: jax.Array) -> float:
    """LDM's ``scale_by_std``: 1 / std of the latents of ``images`` (a posterior sample, as LDM's
    ``get_first_stage_encoding``; std over all elements, unbiased as torch's). Identity: 1.0."""
    if isinstance(module, IdentityAutoencoder):
        return 1.0
    latents = module.apply({"params": params}, jnp.asarray(images, jnp.float32), method="encode")
    z = latents.sample(rng) if hasattr(latents, "sample") else latents
    return float(1.0 / jnp.std(jnp.asarray(z, jnp.float32), ddof=1))
