"""Training objectives: L_simple, L_vlb, L_hybrid, min-SNR weighting, timestep samplers.

Config choices become functions here, before anything is jitted:
`loss_fn = make_loss_fn(schedule, objective="hybrid", prediction="eps", variance="learned_range")`
then, inside the train step, `terms = loss_fn(model_fn, x0, t, noise)`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ldm_jax.diffusion import gaussian, likelihood
from ldm_jax.diffusion.schedules import NoiseSchedule

OBJECTIVES = ("simple", "vlb", "hybrid")
WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLERS = ("uniform", "importance")


def min_snr_weight(snr, prediction: str, gamma: float = 5.0):
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 9 and its v / x0 variants).

    The clamped x0-space weight min(SNR, gamma), expressed for the chosen target:
    x0: min(SNR, gamma); eps: min(SNR, gamma)/SNR (= 1 at SNR <= gamma, incl. SNR = 0);
    v: min(SNR, gamma)/(SNR + 1).
    """
    clamped = jnp.minimum(snr, gamma)
    if prediction == "x0":
        return clamped
    if prediction == "eps":
        return jnp.where(snr <= gamma, 1.0, gamma / jnp.maximum(snr, 1e-20))
    if prediction == "v":
        return clamped / (snr + 1.0)
    gaussian.check_choice("prediction", prediction, gaussian.PREDICTIONS)


class LossTerms(NamedTuple):
    """Per-example values [B]: loss (what to minimise), mse (of the target), vb (the bound's
    estimate in bits/dim: T * L_t + L_T, an unbiased estimate of the full bound; zero for simple)."""

    loss: jax.Array
    mse: jax.Array
    vb: jax.Array


def make_loss_fn(
    schedule: NoiseSchedule,
    *,
    objective: str = "simple",
    prediction: str = "eps",
    variance: str = "fixed_small",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    hybrid_lambda: float = 0.001,
    decoder: str = "continuous",
) -> Callable:
    """Return loss_fn(model_fn, x0, t, noise) -> LossTerms for the chosen objective.

    simple: mean over dims of (target - output)^2 (DDPM eq. 14), target = eps, x0 or v,
      optionally min-SNR weighted.
    vlb: the variational bound. For each example one term L_t at its t, scaled by T, plus the
      prior L_T: T * L_t + L_T is an unbiased estimate of the full bound (DDPM eq. 5), reported in
      bits/dim. With fixed variances this trains the mean only through the bound.
    hybrid: simple + hybrid_lambda * vlb, with the stop-gradient on the mean inside vlb so the bound
      trains only the variance (Improved DDPM sec. 3.1, lambda = 0.001); needs learned_range.
    decoder: the t = 0 term; "discretized" for 8-bit pixels in [-1, 1], "continuous" for latents.
    """
    gaussian.check_choice("objective", objective, OBJECTIVES)
    gaussian.check_choice("prediction", prediction, gaussian.PREDICTIONS)
    gaussian.check_choice("variance", variance, gaussian.VARIANCES)
    gaussian.check_choice("weighting", weighting, WEIGHTINGS)
    gaussian.check_choice("decoder", decoder, likelihood.DECODERS)
    if objective == "hybrid" and variance != "learned_range":
        raise ValueError("objective 'hybrid' trains the variance: it needs variance 'learned_range'")
    T = schedule.num_timesteps

    def loss_fn(model_fn, x0, t, noise) -> LossTerms:
        x0 = x0.astype(jnp.float32)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        output = model_fn(x_t, t).astype(jnp.float32)
        pred, v_net = gaussian.split_learned_variance(output, variance)
        abar = gaussian.gather(schedule.alphas_cumprod, t, x0)
        target = gaussian.target_for(prediction, x0, noise, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
        mse = likelihood.mean_flat((target - pred) ** 2)
        if objective == "simple":
            weight = 1.0 if weighting == "none" else min_snr_weight(schedule.snr(t), prediction, min_snr_gamma)
            return LossTerms(loss=weight * mse, mse=mse, vb=jnp.zeros_like(mse))
        if objective == "hybrid":  # the bound sees a frozen mean: it trains only v_net
            output = jnp.concatenate([jax.lax.stop_gradient(pred), v_net], axis=-1)
        p = gaussian.p_mean_variance(schedule, output, x_t, t, prediction=prediction, variance=variance)
        nats_to_bpd = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))
        vb = (T * likelihood.vlb_terms(schedule, x0, x_t, t, p, decoder) + likelihood.prior_kl(schedule, x0)) * nats_to_bpd
        loss = vb if objective == "vlb" else mse + hybrid_lambda * vb
        return LossTerms(loss=loss, mse=mse, vb=vb)

    return loss_fn


# ----------------------------------------------------------------------------- timestep samplers


class TimestepSampler(NamedTuple):
    """Pure functions over a pytree state:
    init() -> state; sample(state, rng, batch) -> (t [B] int32, weights [B]);
    update(state, t, losses) -> state (feed it the per-example vb terms)."""

    init: Callable
    sample: Callable
    update: Callable


def make_timestep_sampler(name: str, num_timesteps: int, *, history: int = 10, uniform_prob: float = 0.001) -> TimestepSampler:
    """uniform: t ~ U{0..T-1}, weights 1.
    importance: Improved DDPM sec. 3.3's loss-second-moment sampler, p_t ~ sqrt(E[L_t^2]) over the
    last `history` losses per t, mixed with `uniform_prob` of the uniform; uniform until every t
    has `history` losses. Weights 1/(T p_t) keep the loss estimate unbiased.
    """
    gaussian.check_choice("timestep sampler", name, TIMESTEP_SAMPLERS)
    T = num_timesteps

    def uniform_sample(state, rng, batch):
        return jax.random.randint(rng, (batch,), 0, T, jnp.int32), jnp.ones((batch,), jnp.float32)

    if name == "uniform":
        return TimestepSampler(init=lambda: {}, sample=uniform_sample, update=lambda state, t, losses: state)

    def init():
        return {"losses": jnp.zeros((T, history), jnp.float32), "counts": jnp.zeros((T,), jnp.int32)}

    def probabilities(state):
        second_moment = jnp.sqrt(jnp.mean(state["losses"] ** 2, axis=-1))
        p = second_moment / jnp.maximum(jnp.sum(second_moment), 1e-30)
        p = p * (1.0 - uniform_prob) + uniform_prob / T
        warm = jnp.all(state["counts"] >= history)
        return jnp.where(warm, p, jnp.full((T,), 1.0 / T))

    def sample(state, rng, batch):
        p = probabilities(state)
        t = jax.random.choice(rng, T, (batch,), p=p).astype(jnp.int32)
        return t, 1.0 / (T * p[t])

    def update(state, t, losses):
        def push(state, item):  # one example at a time: a batch may repeat a timestep
            ti, loss = item
            row = jnp.roll(state["losses"][ti], -1).at[-1].set(loss)
            row = jnp.where(state["counts"][ti] < history, state["losses"][ti].at[state["counts"][ti]].set(loss), row)
            return {"losses": state["losses"].at[ti].set(row), "counts": state["counts"].at[ti].add(1)}, None

        state, _ = jax.lax.scan(push, state, (t, jax.lax.stop_gradient(losses).astype(jnp.float32)))
        state["counts"] = jnp.minimum(state["counts"], history)
        return state

    return TimestepSampler(init=init, sample=sample, update=update)
