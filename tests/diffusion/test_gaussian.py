import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import gaussian, schedules

SCHED = schedules.make_schedule("linear", 1000)


def test_forward_process_moments():
    x0 = jnp.array([1.5, -0.5, 0.0, 2.0])
    t = 400
    n = 200_000
    noise = jax.random.normal(jax.random.PRNGKey(0), (n, 4))
    xt = gaussian.q_sample(SCHED, jnp.broadcast_to(x0, (n, 4)), jnp.full((n,), t), noise)
    abar = SCHED.alphas_cumprod[t]
    se = np.sqrt((1 - abar) / n)
    np.testing.assert_allclose(xt.mean(0), np.sqrt(abar) * np.asarray(x0), atol=5 * se)
    np.testing.assert_allclose(xt.var(0), 1 - abar, rtol=0.02)
    mean, var = gaussian.q_mean_variance(SCHED, x0[None], jnp.array([t]))
    np.testing.assert_allclose(mean[0], np.sqrt(abar) * np.asarray(x0), rtol=1e-6)
    assert float(var.reshape(-1)[0]) == pytest.approx(1 - abar, rel=1e-6)


@pytest.mark.parametrize("sched", [SCHED, schedules.make_schedule("cosine", 1000, zero_terminal_snr=True)], ids=["linear", "cosine_zsnr"])
@pytest.mark.parametrize("t", [0, 1, 250, 998, 999])
def test_posterior_equals_gaussian_conditioning(sched, t):
    """x_{t-1} = sqrt(abar_{t-1}) x0 + ..., x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e: condition the joint."""
    x0, xt = 0.7, -1.3
    abar_prev = sched.alphas_cumprod_prev[t]
    alpha, beta = sched.alphas[t], sched.betas[t]
    m1, m2 = np.sqrt(abar_prev) * x0, np.sqrt(abar_prev * alpha) * x0
    c11 = 1 - abar_prev
    c12 = np.sqrt(alpha) * c11
    c22 = alpha * c11 + beta
    want_mean = m1 + c12 / c22 * (xt - m2)
    want_var = c11 - c12**2 / c22
    mean, var, log_var = gaussian.q_posterior_mean_variance(sched, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t]))
    assert float(mean[0, 0]) == pytest.approx(want_mean, rel=1e-5, abs=1e-6)
    assert float(var[0, 0]) == pytest.approx(want_var, rel=1e-5, abs=1e-9)
    if t > 0:
        assert float(log_var[0, 0]) == pytest.approx(np.log(want_var), rel=1e-5)


def test_parameterisation_round_trips_and_error_identities():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    x0, eps, x0_hat = (jax.random.normal(kk, (64, 3)) for kk in k[:3])
    abar = jax.random.uniform(k[3], (64, 1), minval=0.01, maxval=0.99)
    a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    xt = a * x0 + s * eps
    v = gaussian.v_from_eps_x0(eps, x0, a, s)
    np.testing.assert_allclose(gaussian.x0_from_eps(xt, eps, a, s), x0, atol=2e-5 / 0.1)
    np.testing.assert_allclose(gaussian.eps_from_x0(xt, x0, a, s), eps, atol=2e-4)
    np.testing.assert_allclose(gaussian.x0_from_v(xt, v, a, s), x0, atol=1e-5)
    np.testing.assert_allclose(gaussian.eps_from_v(xt, v, a, s), eps, atol=1e-5)
    for pred, out in (("eps", eps), ("x0", x0), ("v", v)):
        got_x0, got_eps = gaussian.predict_x0_eps(pred, out, xt, abar)
        np.testing.assert_allclose(got_x0, x0, atol=2e-4)
        np.testing.assert_allclose(got_eps, eps, atol=2e-4)
    # For any x0_hat at fixed x_t: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2, ||v - v_hat||^2 = (SNR+1) ||.||^2.
    eps_hat = gaussian.eps_from_x0(xt, x0_hat, a, s)
    v_hat = gaussian.v_from_eps_x0(eps_hat, x0_hat, a, s)
    snr = abar / (1 - abar)
    err_x0 = jnp.sum((x0 - x0_hat) ** 2, -1, keepdims=True)
    np.testing.assert_allclose(jnp.sum((eps - eps_hat) ** 2, -1, keepdims=True), snr * err_x0, rtol=1e-3)
    np.testing.assert_allclose(jnp.sum((v - v_hat) ** 2, -1, keepdims=True), (snr + 1) * err_x0, rtol=1e-3)


def test_variance_types():
    x = jnp.zeros((3, 2))
    t = jnp.array([0, 1, 500])
    out = jnp.zeros((3, 2))
    small = gaussian.p_mean_variance(SCHED, out, x, t, variance="fixed_small")["log_variance"][:, 0]
    large = gaussian.p_mean_variance(SCHED, out, x, t, variance="fixed_large")["log_variance"][:, 0]
    np.testing.assert_allclose(small, np.log(SCHED.posterior_variance[[1, 1, 500]]), rtol=1e-5)
    np.testing.assert_allclose(large, np.log([SCHED.posterior_variance[1], SCHED.betas[1], SCHED.betas[500]]), rtol=1e-5)
    for v_net, want in ((1.0, np.log(SCHED.betas[[0, 1, 500]])), (-1.0, small)):
        learned_out = jnp.concatenate([out, jnp.full((3, 2), v_net)], axis=-1)
        got = gaussian.p_mean_variance(SCHED, learned_out, x, t, variance="learned_range")["log_variance"][:, 0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction 'epsilon'"):
        gaussian.p_mean_variance(SCHED, out, x, t, prediction="epsilon")
    with pytest.raises(ValueError, match="even number"):
        gaussian.p_mean_variance(SCHED, jnp.zeros((3, 3)), x, t, variance="learned_range")


def test_clip_x0_keeps_eps_consistent():
    xt = jnp.array([[3.0, -3.0]])
    x0, eps = gaussian.predict_x0_eps("x0", jnp.array([[2.0, -0.5]]), xt, jnp.array([[0.5]]), clip_x0=1.0)
    np.testing.assert_allclose(x0, [[1.0, -0.5]])
    np.testing.assert_allclose(np.sqrt(0.5) * x0 + np.sqrt(0.5) * eps, xt, rtol=1e-6)
