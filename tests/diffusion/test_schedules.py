import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import schedules


def test_linear_matches_ddpm_terminal_alpha_bar():
    s = schedules.make_schedule("linear", 1000)
    assert s.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=2e-3)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.betas.dtype == np.float64


def test_linear_is_rescaled_by_1000_over_T():
    s = schedules.make_schedule("linear", 4000)
    assert s.betas[0] == pytest.approx(2.5e-5) and s.betas[-1] == pytest.approx(0.005)


def test_scaled_linear_matches_stable_diffusion():
    s = schedules.make_schedule("scaled_linear", 1000)
    assert np.sqrt(s.alphas_cumprod[-1]) == pytest.approx(0.0683, abs=1e-4)
    assert s.betas[0] == pytest.approx(0.00085) and s.betas[-1] == pytest.approx(0.012)


def test_cosine_follows_formula_and_clips_beta():
    T, s_off = 1000, 0.008
    s = schedules.make_schedule("cosine", T)
    f = lambda t: np.cos((t / T + s_off) / (1 + s_off) * np.pi / 2) ** 2  # noqa: E731
    assert s.betas.max() == 0.999 and s.betas[-1] == 0.999
    t = np.arange(T - 1)
    np.testing.assert_allclose(s.alphas_cumprod[t], f(t + 1) / f(0), rtol=1e-10)


def test_sigmoid_is_a_valid_decreasing_schedule():
    s = schedules.make_schedule("sigmoid", 1000)
    other = schedules.make_schedule("sigmoid", 1000, start=0.0, end=3.0, tau=0.7)
    for sched in (s, other):
        assert np.all(np.diff(sched.alphas_cumprod) < 0)
        assert 0 < sched.alphas_cumprod[-1] < 1e-3 and sched.alphas_cumprod[0] > 0.99
    assert not np.allclose(s.alphas_cumprod, other.alphas_cumprod)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_zero_terminal_snr_rescale(name):
    base = schedules.make_schedule(name, 1000)
    s = schedules.make_schedule(name, 1000, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1] == 0.0
    assert s.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-12)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert np.isneginf(float(s.log_snr(jnp.array(999))))


def test_posterior_tables_match_ddpm_formulas():
    s = schedules.make_schedule("linear", 1000)
    b, a, ab, abp = s.betas, s.alphas, s.alphas_cumprod, s.alphas_cumprod_prev
    np.testing.assert_allclose(s.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef1, np.sqrt(abp) * b / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef2, np.sqrt(a) * (1 - abp) / (1 - ab), rtol=1e-12)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == np.log(s.posterior_variance[1])


def test_fractional_timesteps_interpolate_log_sigma():
    s = schedules.make_schedule("scaled_linear", 1000)
    ints = jnp.arange(0, 1000, 37)
    np.testing.assert_allclose(s.alphas_cumprod_at(ints.astype(jnp.float32)), s.alphas_cumprod[ints], rtol=1e-6)
    mid = np.asarray(s.alphas_cumprod_at(jnp.array([10.5])))[0]
    log_sigma = 0.5 * (np.log(s.sigmas[10]) + np.log(s.sigmas[11]))
    assert mid == pytest.approx(1 / (1 + np.exp(2 * log_sigma)), rel=1e-5)
    snr = np.asarray(s.log_snr(jnp.arange(1000)))
    assert np.all(np.diff(snr) < 0)


def test_bad_names_and_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine"):
        schedules.make_schedule("cosin", 1000)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.make_schedule("linear", 1)
    with pytest.raises(ValueError, match="bad keyword"):
        schedules.make_schedule("cosine", 100, beta_end=0.1)
