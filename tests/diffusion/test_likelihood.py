import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ldm_jax.diffusion import likelihood, schedules
from tests.diffusion.oracles import GaussianMixture


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
    want = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.5**2) / (2 * 2.0) - 0.5
    assert float(likelihood.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(want, rel=1e-6)
    assert float(likelihood.normal_kl(m1, lv1, m1, lv1)) == pytest.approx(0.0, abs=1e-7)


def test_continuous_decoder_is_gaussian_log_density():
    x, m, lv = np.array([0.1, -2.0, 3.0]), np.array([0.0, -1.0, 2.0]), np.log([0.2, 1.0, 4.0])
    want = stats.norm.logpdf(x, m, np.exp(0.5 * lv))
    np.testing.assert_allclose(likelihood.continuous_gaussian_log_likelihood(x, m, lv), want, rtol=1e-5)


@pytest.mark.parametrize("mean,log_scale", [(0.0, np.log(0.1)), (0.9, np.log(0.01)), (-0.3, np.log(2.0)), (0.5, np.log(1e-4))])
def test_discretized_decoder_is_a_distribution_over_256_bins(mean, log_scale):
    bins = np.arange(256) / 127.5 - 1.0
    logp = likelihood.discretized_gaussian_log_likelihood(jnp.asarray(bins, jnp.float32), mean, log_scale)
    assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=1e-4)
    # Interior bins are differences of CDFs at the bin edges (+-1/255 around the centre).
    scale = np.exp(log_scale)
    mid = bins[1:-1]
    want = stats.norm.cdf(mid + 1 / 255, mean, scale) - stats.norm.cdf(mid - 1 / 255, mean, scale)
    big = want > 1e-6
    np.testing.assert_allclose(np.exp(np.asarray(logp[1:-1]))[big], want[big], rtol=1e-3, atol=1e-7)
    assert float(logp[0]) == pytest.approx(stats.norm.logcdf(-1 + 1 / 255, mean, scale), rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def standard_gaussian_bound():
    """x0 ~ N(0, I): every marginal is N(0, I) and the true reverse kernel is N(sqrt(alpha_t) x_t, beta_t)."""
    sched = schedules.make_schedule("linear", 1000)
    oracle = GaussianMixture([1.0], [[0.0] * 4], [[1.0] * 4]).model_fn(sched)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4096, 4))
    nll_bits = np.asarray(0.5 * np.log(2 * np.pi) + 0.5 * x0**2).mean(1) / np.log(2)
    results = {
        var: likelihood.bits_per_dim(oracle, sched, x0, jax.random.PRNGKey(1), variance=var, decoder="continuous")
        for var in ("fixed_large", "fixed_small")
    }
    return sched, nll_bits, results


def test_bound_with_exact_reverse_kernels_equals_the_likelihood(standard_gaussian_bound):
    """With the oracle mean and fixed_large variance every kernel for t >= 1 is exact, so the
    bound equals -log N(x0; 0, I) in expectation, up to one known, closed-form gap: at t = 0 DDPM
    uses beta-tilde_1 instead of beta_0 as the decoder's variance, which costs
    0.5 (r - 1 - log r) nats per dimension, r = beta_0 / beta-tilde_1."""
    sched, nll_bits, results = standard_gaussian_bound
    r = sched.betas[0] / sched.posterior_variance[1]
    gap_bits = 0.5 * (r - 1 - np.log(r)) / np.log(2)
    diff = np.asarray(results["fixed_large"]["total"]) - nll_bits
    stderr = diff.std() / np.sqrt(diff.size)
    assert stderr < 0.03
    assert abs(diff.mean() - gap_bits) < 4 * stderr, (diff.mean(), gap_bits, stderr)


def test_bound_with_other_variances_is_looser(standard_gaussian_bound):
    _, nll_bits, results = standard_gaussian_bound
    large = np.asarray(results["fixed_large"]["total"])
    small = np.asarray(results["fixed_small"]["total"])
    diff = small - large
    assert diff.mean() > 10 * diff.std() / np.sqrt(diff.size)
    assert small.mean() > nll_bits.mean()


def test_bound_breakdown_adds_up(standard_gaussian_bound):
    sched, _, results = standard_gaussian_bound
    r = results["fixed_small"]
    assert r["terms"].shape == (4096, sched.num_timesteps)
    np.testing.assert_allclose(r["total"], r["prior"] + r["decoder"] + r["diffusion"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r["diffusion"], r["terms"][:, 1:].sum(1), rtol=1e-5, atol=1e-4)
    # Prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), tiny for the linear schedule.
    assert 0 < float(r["prior"].mean()) < 1e-4


def test_discretized_decoder_changes_only_the_t0_term():
    """Same noise, same model: switching the decoder changes L_0 and nothing else; a discretized
    L_0 is -log of a probability, so it is non-negative."""
    sched = schedules.make_schedule("linear", 200)
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(64, 6)) / 127.5 - 1.0, jnp.float32)
    oracle = GaussianMixture([1.0], [[0.0] * 6], [[float(pixels.var())] * 6]).model_fn(sched)
    disc = likelihood.bits_per_dim(oracle, sched, pixels, jax.random.PRNGKey(0), decoder="discretized")
    cont = likelihood.bits_per_dim(oracle, sched, pixels, jax.random.PRNGKey(0), decoder="continuous")
    np.testing.assert_allclose(disc["terms"][:, 1:], cont["terms"][:, 1:], rtol=1e-6)
    np.testing.assert_allclose(disc["prior"], cont["prior"], rtol=1e-6)
    assert float(disc["decoder"].min()) >= 0.0
    assert not np.allclose(disc["decoder"], cont["decoder"])
