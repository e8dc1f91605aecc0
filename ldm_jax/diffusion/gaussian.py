"""The Gaussian forward process, its posterior, and what a network output means.

Notation (REFERENCE.md): abar_t = alphas_cumprod[t], alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
All functions are pure and jittable; `t` is an int32 array [B] of 0-based timesteps and per-example
scalars broadcast against x [B, ...].
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def check_choice(key: str, value: str, allowed) -> str:
    """Raise a ValueError naming `key` and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


def broadcast_to_rank(a, x):
    """Reshape per-example values a [B] (or a scalar) to broadcast against x [B, ...]."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def gather(table, t, x):
    """table[t] as float32, broadcast against x. `table` is a float64 numpy schedule table."""
    return broadcast_to_rank(jnp.asarray(table, jnp.float32)[t], x)


# ----------------------------------------------------------------------------- forward process


def q_mean_variance(schedule: NoiseSchedule, x0, t):
    """Mean and variance of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (DDPM eq. 4)."""
    abar = gather(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(abar) * x0, 1.0 - abar


def q_sample(schedule: NoiseSchedule, x0, t, noise):
    """Draw x_t = alpha_t x_0 + sigma_t eps, eps = `noise` (DDPM eq. 4)."""
    abar = gather(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior_mean_variance(schedule: NoiseSchedule, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde_t I) (DDPM eqs. 6-7).

    Returns (mean, variance, log_variance_clipped); the log is clipped at t=0 as in DDPM, where
    beta-tilde_0 = 0.
    """
    mean = gather(schedule.posterior_mean_coef1, t, x_t) * x0 + gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    var = gather(schedule.posterior_variance, t, x_t)
    log_var = gather(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var


# ----------------------------------------------------------------------------- parameterisations
# alpha, sigma: sqrt(abar) and sqrt(1 - abar), broadcast against x.


def x0_from_eps(x_t, eps, alpha, sigma):
    """x_0 = (x_t - sigma eps) / alpha (DDPM eq. 4 solved for x_0)."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    """eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x0) / sigma


def v_from_eps_x0(eps, x0, alpha, sigma):
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022, sec. 4)."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
    """x_0 = alpha x_t - sigma v."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
    """eps = sigma x_t + alpha v."""
    return sigma * x_t + alpha * v


def target_for(prediction: str, x0, eps, alpha, sigma):
    """What a network with this `prediction` type should output for (x_0, eps)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return v_from_eps_x0(eps, x0, alpha, sigma)


def predict_x0_eps(prediction: str, output, x_t, abar, clip_x0: float | None = None):
    """Turn a network output into (x0_hat, eps_hat) at noise level abar (broadcast against x_t).

    eps: x0 from eps; x0: eps from x0; v: both from v (Salimans & Ho 2022). With `clip_x0` the
    predicted x_0 is clipped to [-clip_x0, clip_x0] (DDPM's pixel-space sampling) and eps is
    re-derived from it so the two stay consistent.
    """
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction == "eps":
        eps, x0 = output, x0_from_eps(x_t, output, alpha, sigma)
    elif prediction == "x0":
        x0, eps = output, eps_from_x0(x_t, output, alpha, sigma)
    elif prediction == "v":
        x0, eps = x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma)
    else:
        check_choice("prediction", prediction, PREDICTIONS)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = eps_from_x0(x_t, x0, alpha, sigma)
    return x0, eps


# ----------------------------------------------------------------------------- reverse process


def reverse_tables(schedule: NoiseSchedule) -> dict[str, np.ndarray]:
    """Per-timestep float64 tables that define p_theta(x_{t-1} | x_t) for every variance type.

    log_variance_small: log beta-tilde, clipped at t=0 (fixed_small, and learned_range's minimum).
    log_variance_large: log beta with index 0 set to beta-tilde_1, as DDPM does (fixed_large).
    log_betas: log beta (learned_range's maximum, Improved DDPM eq. 15).
    """
    return dict(
        alphas_cumprod=schedule.alphas_cumprod,
        posterior_mean_coef1=schedule.posterior_mean_coef1,
        posterior_mean_coef2=schedule.posterior_mean_coef2,
        log_variance_small=schedule.posterior_log_variance_clipped,
        log_variance_large=np.log(np.append(schedule.posterior_variance[1], schedule.betas[1:])),
        log_betas=np.log(schedule.betas),
    )


def split_learned_variance(output, variance: str):
    """For learned_range the network's last axis holds [prediction, v_net]; return them (v_net None otherwise)."""
    if variance != "learned_range":
        return output, None
    channels = output.shape[-1]
    if channels % 2:
        raise ValueError(f"learned_range needs an even number of output channels, got {channels}")
    return output[..., : channels // 2], output[..., channels // 2 :]


def p_mean_variance_from(
    coefs: Mapping[str, jax.Array],
    output,
    x_t,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
):
    """p_theta(x_{t-1} | x_t) from the network output and this step's `coefs` (see `reverse_tables`,
    entries already gathered and broadcast against x_t).

    mean = posterior mean with x_0 replaced by its prediction (DDPM eq. 11 in x_0 form).
    log variance: fixed_small -> log beta-tilde; fixed_large -> log beta; learned_range ->
    u log beta + (1 - u) log beta-tilde with u = (v_net + 1)/2 (Improved DDPM eq. 15).
    Returns dict(mean, variance, log_variance, pred_x0, pred_eps).
    """
    pred, v_net = split_learned_variance(output, variance)
    x0, eps = predict_x0_eps(prediction, pred, x_t, coefs["alphas_cumprod"], clip_x0)
    mean = coefs["posterior_mean_coef1"] * x0 + coefs["posterior_mean_coef2"] * x_t
    if variance == "fixed_small":
        log_var = jnp.broadcast_to(coefs["log_variance_small"], mean.shape)
    elif variance == "fixed_large":
        log_var = jnp.broadcast_to(coefs["log_variance_large"], mean.shape)
    elif variance == "learned_range":
        u = (v_net.astype(jnp.float32) + 1.0) / 2.0
        log_var = u * coefs["log_betas"] + (1.0 - u) * coefs["log_variance_small"]
    else:
        check_choice("variance", variance, VARIANCES)
    return dict(mean=mean, variance=jnp.exp(log_var), log_variance=log_var, pred_x0=x0, pred_eps=eps)


def p_mean_variance(
    schedule: NoiseSchedule,
    output,
    x_t,
    t,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
):
    """p_theta(x_{t-1} | x_t) at timesteps t [B]: see `p_mean_variance_from`."""
    coefs = {k: gather(v, t, x_t) for k, v in reverse_tables(schedule).items()}
    return p_mean_variance_from(coefs, output, x_t, prediction=prediction, variance=variance, clip_x0=clip_x0)
