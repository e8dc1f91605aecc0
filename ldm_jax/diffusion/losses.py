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

from ldm_jax.diffusion import gaussian, likelihood, processes
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


# ----------------------------------------------------------------------------- continuous processes

PROCESS_OBJECTIVES = ("simple", "vlb")  # vlb: VDM's continuous-time bound (process "vdm" only)
PROCESS_WEIGHTINGS = ("none", "min_snr", "edm", "sd3")
PROCESS_TIME_SAMPLERS = ("uniform", "logit_normal", "lognormal")


def edm_weight(sigma_ve, sigma_data: float):
    """EDM's loss weight in x0-space, lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    (Karras et al. 2022, Table 1): with EDM's preconditioning it gives the network's output unit weight."""
    return (sigma_ve**2 + sigma_data**2) / (sigma_ve * sigma_data) ** 2


def sd3_cosmap_weight(t):
    """SD3's CosMap weighting of the velocity loss (Esser et al. 2024, sec. 3.1; diffusers'
    `compute_loss_weighting_for_sd3(weighting_scheme="cosmap")`): 2 / (pi (1 - 2t + 2t^2))."""
    return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))


def make_process_loss_fn(
    process,
    *,
    objective: str = "simple",
    prediction: str = "velocity",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
    decoder: str = "continuous",
) -> Callable:
    """Return loss_fn(model_fn, proc, x0, t, noise) -> LossTerms for a continuous process.

    `proc` is the process to use in the step (`process` with its learned parameters bound, for VDM);
    t [B] float in the process's own time; model_fn(x_t, t) -> the `prediction`.
    simple: mean over dims of w(t) (target - output)^2 with the prediction's own target (eps, x0, v,
      or velocity = alpha' x0 + sigma' eps, e.g. eps - x0 for flow: SD3's), and w one of
      none; min_snr (Hang et al. 2023: min(SNR, gamma) in x0-space, divided by the prediction's
      squared x0-error scale, `processes.x0_error_scale`); edm (lambda(sigma) in x0-space with
      sigma = sigma/alpha, divided likewise: EDM's loss when the model is EDM-preconditioned); sd3
      (CosMap, for flow).
    vlb (process "vdm"): VDM's continuous-time bound (Kingma et al. 2021, eq. 17 for T -> inf), in
      bits/dim per example: the diffusion term 1/2 gamma'(t) ||eps - eps_hat||^2 (t ~ U(0, 1): an
      unbiased estimate of its integral), plus the prior KL(q(z_1 | x) || N(0, I)) and the
      reconstruction -log p(x | z_0) ("continuous": N(x; z_0/alpha_0, sigma_0^2/alpha_0^2);
      "discretized": the same Gaussian over 8-bit bins). Its gradient trains gamma's endpoints
      (through the prior and reconstruction terms) and its shape.
    """
    gaussian.check_choice("objective", objective, PROCESS_OBJECTIVES)
    gaussian.check_choice("prediction", prediction, processes.PREDICTIONS)
    gaussian.check_choice("weighting", weighting, PROCESS_WEIGHTINGS)
    gaussian.check_choice("decoder", decoder, likelihood.DECODERS)
    if objective == "vlb" and process.name != "vdm":
        raise ValueError(f"objective 'vlb' is VDM's continuous-time bound: it needs process 'vdm', not "
                         f"{process.name!r} (flow and EDM have no variational bound to train on; their "
                         "likelihood comes from likelihood.ode_log_likelihood)")
    if weighting == "sd3" and process.name != "flow":
        raise ValueError(f"weighting 'sd3' (CosMap) is for process 'flow', not {process.name!r}")

    def loss_fn(model_fn, proc, x0, t, noise) -> LossTerms:
        x0 = x0.astype(jnp.float32)
        t = t.astype(jnp.float32)
        alpha, sigma, d_alpha, d_sigma = proc.alpha_sigma_derivatives(t)
        a, s = gaussian.broadcast_to_rank(alpha, x0), gaussian.broadcast_to_rank(sigma, x0)
        x_t = a * x0 + s * noise
        output = model_fn(x_t, t).astype(jnp.float32)
        target = processes.target_for(prediction, x0, noise, alpha, sigma, d_alpha, d_sigma)
        mse = likelihood.mean_flat((target - output) ** 2)
        if objective == "vlb":
            return _vdm_terms(proc, prediction, output, x0, x_t, t, noise, alpha, sigma, d_alpha, d_sigma, decoder,
                              mse)
        scale2 = processes.x0_error_scale(prediction, alpha, sigma, d_alpha, d_sigma) ** 2
        if weighting == "none":
            weight = 1.0
        elif weighting == "min_snr":
            weight = jnp.minimum((alpha / sigma) ** 2, min_snr_gamma) / scale2
        elif weighting == "edm":
            weight = edm_weight(sigma / alpha, sigma_data) / scale2
        else:
            weight = sd3_cosmap_weight(t)
        return LossTerms(loss=weight * mse, mse=mse, vb=jnp.zeros_like(mse))

    return loss_fn


def _vdm_terms(proc, prediction, output, x0, x_t, t, noise, alpha, sigma, d_alpha, d_sigma, decoder, mse):
    """VDM's bound, per example, in bits/dim (see make_process_loss_fn)."""
    parts = vdm_bound_terms(proc, prediction, output, x0, x_t, t, noise, alpha, sigma, d_alpha, d_sigma, decoder)
    vb = (parts["diffusion"] + parts["prior"] + parts["recon"]) / (math.prod(x0.shape[1:]) * math.log(2.0))
    return LossTerms(loss=vb, mse=mse, vb=vb)


def vdm_bound_terms(proc, prediction, output, x0, x_t, t, noise, alpha, sigma, d_alpha, d_sigma, decoder) -> dict:
    """The three terms of VDM's continuous-time bound for one draw of (t, noise), in nats per
    example [B] (Kingma et al. 2021, eqs. 11 and 17): diffusion = 1/2 gamma'(t) ||eps - eps_hat||^2
    (an unbiased estimate of its integral over t ~ U(0, 1)), prior = KL(q(z_1 | x) || N(0, I)) and
    recon = -log p(x | z_0), with z_0 = alpha_0 x + sigma_0 noise."""
    axes = tuple(range(1, x0.ndim))
    eps_hat = processes.to_x0_eps(prediction, output, x_t, alpha, sigma, d_alpha, d_sigma)[1]
    _, d_gamma = jax.jvp(proc.gamma, (t,), (jnp.ones_like(t),))
    diffusion = 0.5 * d_gamma * jnp.sum((noise - eps_hat) ** 2, axis=axes)
    a1, s1 = (gaussian.broadcast_to_rank(v, x0) for v in proc.alpha_sigma(jnp.ones_like(t)))
    prior = jnp.sum(likelihood.normal_kl(a1 * x0, 2.0 * jnp.log(s1), 0.0, 0.0), axis=axes)
    a0, s0 = (gaussian.broadcast_to_rank(v, x0) for v in proc.alpha_sigma(jnp.zeros_like(t)))
    z0 = a0 * x0 + s0 * noise  # the same noise: an unbiased estimate all the same
    log_scale = jnp.log(s0) - jnp.log(a0)
    if decoder == "discretized":
        log_p = likelihood.discretized_gaussian_log_likelihood(x0, z0 / a0, log_scale)
    else:
        log_p = likelihood.continuous_gaussian_log_likelihood(x0, z0 / a0, 2.0 * log_scale)
    return {"diffusion": diffusion, "prior": prior, "recon": -jnp.sum(log_p, axis=axes)}


def make_process_time_sampler(name: str, process, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                              p_mean: float = -1.2, p_std: float = 1.2) -> TimestepSampler:
    """Training times for a continuous process (same interface as `make_timestep_sampler`, weights 1):
    uniform: U(t_min, t_max) in the process's own time (`proc.sample_time`; flow's then shifted);
    logit_normal: t = sigmoid(m + s n), n ~ N(0, 1), over [0, 1] (Esser et al. 2024, sec. 3.1; m = 0,
      s = 1 best of their 61), then flow's shift; for processes with t in [0, 1];
    lognormal: EDM's ln(sigma/alpha) ~ N(p_mean, p_std^2) (Karras et al. 2022, sec. 5), mapped to the
      process's time through its log-SNR.
    """
    gaussian.check_choice("timestep sampler", name, PROCESS_TIME_SAMPLERS)
    if name == "logit_normal" and (process.t_min, process.t_max) != (0.0, 1.0):
        raise ValueError(f"timestep sampler 'logit_normal' draws t in (0, 1): process {process.name!r} has "
                         f"t in [{process.t_min}, {process.t_max}]; use 'lognormal' or 'uniform'")
    if name == "lognormal" and getattr(process, "learned", False):  # sample() never sees the bound schedule
        raise ValueError(f"timestep sampler 'lognormal' maps sigma to t through a fixed schedule: process "
                         f"{process.name!r} learns its gamma; use 'uniform' or 'logit_normal' (or learned=False)")

    def sample(state, rng, batch):
        if name == "uniform":
            t = process.sample_time(rng, batch)
        elif name == "logit_normal":
            t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
            if process.name == "flow":
                t = processes.shift_time(t, process.shift)
        else:
            log_sigma = p_mean + p_std * jax.random.normal(rng, (batch,), jnp.float32)
            t = process.time_at_log_snr(-2.0 * log_sigma)
        t = jnp.clip(t, process.t_min, process.t_max)
        if process.name == "flow":  # keep alpha and sigma away from 0 (eps and x0 targets need both)
            t = jnp.clip(t, 1e-5, 1.0 - 1e-5)
        return t, jnp.ones((batch,), jnp.float32)

    return TimestepSampler(init=lambda: {}, sample=sample, update=lambda state, t, losses: state)
