"""Discrete noise schedules q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t = 0..T-1.

Indices are 0-based: index t here is step t+1 of the DDPM paper. Everything is built once in
float64 numpy (`NoiseSchedule`); jitted code reads the tables as float32 constants through the
`*_at` methods, which also accept fractional t (used by the Karras samplers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")


def posterior_coefficients(abar_t, abar_s):
    """Coefficients of q(x_s | x_t, x_0) for any s < t (DDPM eqs. 6-7 with a jump from t to s).

    With beta_ts = 1 - abar_t / abar_s the step's effective beta:
      mean = coef_x0 * x_0 + coef_xt * x_t,
      coef_x0 = sqrt(abar_s) * beta_ts / (1 - abar_t),
      coef_xt = sqrt(1 - beta_ts) * (1 - abar_s) / (1 - abar_t),
      variance = beta_ts * (1 - abar_s) / (1 - abar_t)   (beta-tilde).
    Works on numpy arrays and on jax arrays alike (arithmetic only). For s = t - 1 this is the
    one-step posterior; for a respaced sampler (Improved DDPM sec. 4) s is the next timestep used.
    Returns (coef_x0, coef_xt, variance, beta_ts).
    """
    beta = 1.0 - abar_t / abar_s
    coef_x0 = abar_s**0.5 * beta / (1.0 - abar_t)
    coef_xt = (1.0 - beta) ** 0.5 * (1.0 - abar_s) / (1.0 - abar_t)
    variance = beta * (1.0 - abar_s) / (1.0 - abar_t)
    return coef_x0, coef_xt, variance, beta


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule, float64 numpy throughout.

    Attributes (all [T] float64):
      betas, alphas (= 1 - betas), alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1},
      1 at t=0), posterior_variance (beta-tilde_t, DDPM eq. 7), posterior_log_variance_clipped
      (log beta-tilde with index 0 replaced by index 1, as DDPM does since beta-tilde_0 = 0),
      posterior_mean_coef1 / posterior_mean_coef2 (of x_0 and x_t in the posterior mean).
    """

    name: str
    betas: np.ndarray

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be a 1-D array with at least 2 entries, got shape {betas.shape}")
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        coef_x0, coef_xt, var, _ = posterior_coefficients(abar, abar_prev)
        derived = dict(
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            posterior_variance=var,
            posterior_log_variance_clipped=np.log(np.append(var[1], var[1:])),
            posterior_mean_coef1=coef_x0,
            posterior_mean_coef2=coef_xt,
        )
        for key, value in derived.items():
            value.setflags(write=False)
            object.__setattr__(self, key, value)
        betas.setflags(write=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> np.ndarray:
        """Karras/EDM noise levels sigma_t = sqrt((1 - abar_t) / abar_t) (inf where abar_t = 0)."""
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def alphas_cumprod_at(self, t) -> jnp.ndarray:
        """abar at integer or fractional t (float32, jittable).

        Integer t gathers from the table. Fractional t interpolates log sigma linearly in t, as
        k-diffusion does for sigmas between grid points, and converts back: abar = 1/(1+sigma^2).
        """
        t = jnp.asarray(t)
        table = jnp.asarray(self.alphas_cumprod, jnp.float32)
        if jnp.issubdtype(t.dtype, jnp.integer):
            return table[t]
        log_sigma = jnp.asarray(np.log(np.clip(self.sigmas, 1e-30, 1e15)), jnp.float32)  # finite at abar=0
        t = jnp.clip(t, 0.0, self.num_timesteps - 1)
        lo = jnp.floor(t).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_timesteps - 1)
        w = t - lo
        log_sigma_t = (1.0 - w) * log_sigma[lo] + w * log_sigma[hi]
        frac = 1.0 / (1.0 + jnp.exp(2.0 * log_sigma_t))
        return jnp.where(t == lo, table[lo], frac)

    def log_snr(self, t) -> jnp.ndarray:
        """log SNR_t = log(abar_t / (1 - abar_t)) at integer or fractional t (float32)."""
        abar = self.alphas_cumprod_at(t)
        return jnp.log(abar) - jnp.log1p(-abar)

    def snr(self, t) -> jnp.ndarray:
        """SNR_t = abar_t / (1 - abar_t) (float32)."""
        abar = self.alphas_cumprod_at(t)
        return abar / (1.0 - abar)


def _linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, rescale: bool = True):
    """DDPM's linear betas; Improved DDPM rescales the endpoints by 1000/T so any T spans the same."""
    scale = 1000.0 / T if rescale else 1.0
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def _scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012):
    """LDM / Stable Diffusion: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2."""
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _betas_from_alpha_bar(T: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999):
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) (Improved DDPM eq. 17's discretisation)."""
    ts = np.arange(T + 1, dtype=np.float64) / T
    f = np.array([alpha_bar(t) for t in ts])
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999):
    """Improved DDPM eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2); beta <= 0.999."""
    return _betas_from_alpha_bar(T, lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2, max_beta)


def _sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999):
    """Chen 2023 ("On the importance of noise scheduling"), sigmoid schedule:

    abar(t) = (sigmoid(end/tau) - sigmoid((t (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)),
    t in [0, 1]; start/end bound the sigmoid's input range and tau its temperature (a larger tau
    spends more steps at high noise). Discretised like the cosine schedule, beta <= 0.999.
    """
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)

    def alpha_bar(t):
        return max((v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start), 1e-9)

    return _betas_from_alpha_bar(T, alpha_bar, max_beta)


_BETA_FNS = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "cosine": _cosine_betas,
    "sigmoid": _sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so sqrt(abar_T) = 0, sqrt(abar_1) kept."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def make_schedule(name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> NoiseSchedule:
    """Build a named schedule with `num_timesteps` steps.

    name: "linear" (DDPM, beta 1e-4 -> 0.02 rescaled by 1000/T; kwargs beta_start, beta_end,
    rescale), "scaled_linear" (SD/LDM; beta_start, beta_end), "cosine" (Improved DDPM; s,
    max_beta), "sigmoid" (Chen 2023; start, end, tau, max_beta).
    zero_terminal_snr: rescale so abar_T = 0 exactly (Lin et al. 2023); use with v-prediction.
    """
    if name not in _BETA_FNS:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    try:
        betas = _BETA_FNS[name](int(num_timesteps), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad keyword for schedule {name!r}: {e}") from None
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
        name = f"{name}+zero_terminal_snr"
    return NoiseSchedule(name=name, betas=betas)
