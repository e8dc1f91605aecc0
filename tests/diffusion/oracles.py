"""Closed-form optimal denoisers for Gaussian and Gaussian-mixture data.

For x0 ~ sum_k pi_k N(mu_k, diag lambda_k) and x_t = alpha x0 + sigma eps:
  x_t | k ~ N(alpha mu_k, alpha^2 lambda_k + sigma^2),
  E[x0 | x_t, k] = mu_k + lambda_k alpha / (alpha^2 lambda_k + sigma^2) (x_t - alpha mu_k),
  E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k].
The oracle eps / x0 / v predictors are the conditional expectations of their targets, which is
what minimises L_simple; for a single Gaussian everything else is closed form too.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import gaussian


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
