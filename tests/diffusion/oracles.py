"""Closed-form optimal denoisers for Gaussian and Gaussian-mixture data.

For x0 ~ sum_k pi_k N(mu_k, diag lambda_k) and x_t = alpha x0 + sigma eps:
  x_t | k ~ N(alpha mu_k, alpha^2 lambda_k + sigma^2),
  E[x0 | x_t, k] = mu_k + lambda_k alpha / (alpha^2 lambda_k + sigma^2) (x_t - alpha mu_k),
  E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k].
The oracle eps / x0 / v predictors are the conditional expectations of their targets, which is
what minimises L_simple; for a single Gaussian everything else is closed form too.
`process_model_fn` is the same oracle for any `processes.Process` (flow, EDM, VDM, discrete).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ldm_jax.diffusion import gaussian, processes


class GaussianMixture:
    def __init__(self, weights, means, variances):
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)  # [K, D]
        self.variances = np.asarray(variances, np.float64)  # [K, D]
        self.dim = self.means.shape[1]

    def sample(self, rng: np.random.Generator, n: int):
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.means[labels] + np.sqrt(self.variances[labels]) * rng.standard_normal((n, self.dim))
        return x.astype(np.float32), labels

    def posterior_mean(self, x_t, abar):
        """E[x0 | x_t] for x_t [B, D], abar [B, 1] (jnp, float32)."""
        mu, lam = jnp.asarray(self.means, jnp.float32), jnp.asarray(self.variances, jnp.float32)
        alpha = jnp.sqrt(abar)[:, None, :]  # [B, 1, 1]
        var = alpha**2 * lam[None] + (1.0 - abar)[:, None, :]  # [B, K, D]
        resid = x_t[:, None, :] - alpha * mu[None]
        log_lik = -0.5 * jnp.sum(resid**2 / var + jnp.log(var), axis=-1)  # [B, K]
        resp = jax.nn.softmax(log_lik + jnp.log(jnp.asarray(self.weights, jnp.float32)), axis=-1)
        cond_means = mu[None] + lam[None] * alpha / var * resid
        return jnp.sum(resp[..., None] * cond_means, axis=1)

    def model_fn(self, schedule, prediction="eps"):
        """The optimal network (x_t [B, D], t [B]) -> prediction of type `prediction`."""

        def fn(x_t, t):
            abar = schedule.alphas_cumprod_at(t).reshape(-1, 1)
            x0 = self.posterior_mean(x_t, abar)
            alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
            eps = gaussian.eps_from_x0(x_t, x0, alpha, sigma)
            return gaussian.target_for(prediction, x0, eps, alpha, sigma)

        return fn


def _process_posterior_mean(weights, means, variances, x_t, alpha, sigma):
    """E[x0 | x_t] for x_t = alpha x0 + sigma eps, alpha and sigma [B]: the formulas above hold for any
    (alpha, sigma), variance preserving or not (x_t | k ~ N(alpha mu_k, alpha^2 lambda_k + sigma^2))."""
    a, s = alpha[:, None, None], sigma[:, None, None]  # [B, 1, 1]
    mu, lam = means[None], variances[None]  # [1, K, D]
    var = a**2 * lam + s**2  # [B, K, D]
    resid = x_t[:, None, :] - a * mu
    log_lik = -0.5 * jnp.sum(resid**2 / var + jnp.log(var), axis=-1)  # [B, K]
    resp = jax.nn.softmax(log_lik + jnp.log(weights), axis=-1)
    cond_means = mu + lam * a / var * resid
    return jnp.sum(resp[..., None] * cond_means, axis=1)


def _levels(proc, prediction, t):
    if prediction == "velocity":
        return proc.alpha_sigma_derivatives(t)
    return (*proc.alpha_sigma(t), jnp.zeros(t.shape), jnp.zeros(t.shape))  # integer discrete t has no derivatives


def _process_oracle(prediction, weights, means, variances, proc, x_t, t):
    if jax.tree.leaves(proc):  # a learned schedule (VDM's gamma: a 1024-wide network per time)
        # The samplers call the model with one time for the whole batch: evaluate it once then.
        levels = jax.lax.cond(jnp.all(t == t[0]),
                              lambda: tuple(jnp.broadcast_to(v, t.shape) for v in _levels(proc, prediction, t[:1])),
                              lambda: _levels(proc, prediction, t))
    else:
        levels = _levels(proc, prediction, t)
    alpha, sigma, d_alpha, d_sigma = (v.astype(jnp.float32) for v in levels)
    x0 = _process_posterior_mean(weights, means, variances, x_t, alpha, sigma)
    eps = (x_t - alpha[:, None] * x0) / sigma[:, None]
    return processes.target_for(prediction, x0, eps, alpha, sigma, d_alpha, d_sigma)


# One static function per prediction, so that every mixture and process (traced leaves of the
# Partial) shares the sampler's compiled program.
_PROCESS_ORACLES = {p: functools.partial(_process_oracle, p) for p in processes.PREDICTIONS}


def process_model_fn(mixture: GaussianMixture, proc, prediction: str = "eps") -> Partial:
    """The optimal network (x_t [B, D], t [B] in `proc`'s own time) -> prediction of type
    `prediction` for data from `mixture`, under any `processes.Process`."""
    arrays = (jnp.asarray(a, jnp.float32) for a in (mixture.weights, mixture.means, mixture.variances))
    return Partial(_PROCESS_ORACLES[prediction], *arrays, proc)
