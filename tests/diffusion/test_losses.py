import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import gaussian, likelihood, losses, schedules
from tests.diffusion.oracles import GaussianMixture

SCHED = schedules.make_schedule("linear", 1000)
MU, LAM = 0.5, 0.3
ORACLE = GaussianMixture([1.0], [[MU] * 8], [[LAM] * 8])


def analytic_min_mse(prediction, abar):
    """Per-dimension minimum of L_simple at abar for x0 ~ N(mu, lam): the target's posterior variance."""
    var_x0 = LAM * (1 - abar) / (abar * LAM + 1 - abar)  # Var(x0 | x_t)
    snr = abar / (1 - abar)
    return {"x0": var_x0, "eps": snr * var_x0, "v": (snr + 1) * var_x0}[prediction]


@pytest.mark.parametrize("prediction", gaussian.PREDICTIONS)
def test_simple_loss_of_the_oracle_is_the_analytic_minimum(prediction):
    loss_fn = jax.jit(losses.make_loss_fn(SCHED, prediction=prediction), static_argnums=0)
    n = 20_000
    x0 = jnp.asarray(ORACLE.sample(np.random.default_rng(0), n)[0])
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    model = ORACLE.model_fn(SCHED, prediction)
    for t in (10, 300, 900):
        terms = loss_fn(model, x0, jnp.full((n,), t, jnp.int32), noise)
        want = analytic_min_mse(prediction, SCHED.alphas_cumprod[t])
        assert float(terms.loss.mean()) == pytest.approx(want, rel=0.03), (t, prediction)
        # A worse predictor does worse: the minimum is a minimum.
        worse = loss_fn(lambda x, tt: model(x, tt) * 1.05 + 0.01, x0, jnp.full((n,), t, jnp.int32), noise)
        assert float(worse.loss.mean()) > float(terms.loss.mean())


def test_min_snr_weights_are_one_objective_in_three_parameterisations():
    """min(SNR, gamma) ||x0 - x0_hat||^2 is the same number whether the network predicts eps, x0 or v."""
    gamma = 5.0
    snr = jnp.array([0.0, 0.1, 1.0, 5.0, 50.0, 1e4])
    np.testing.assert_allclose(losses.min_snr_weight(snr, "eps", gamma), [1, 1, 1, 1, 0.1, 5e-4], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weight(snr, "x0", gamma), jnp.minimum(snr, gamma))
    np.testing.assert_allclose(losses.min_snr_weight(snr, "v", gamma), jnp.minimum(snr, gamma) / (snr + 1))
    t = jnp.array([5, 50, 200, 600, 950])
    x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
    noise = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
    x0_hat_fn = lambda x_t, tt: 0.8 * x_t  # noqa: E731 - any predictor of x0
    values = []
    for pred in gaussian.PREDICTIONS:
        def model(x_t, tt, pred=pred):
            abar = gaussian.gather(SCHED.alphas_cumprod, tt, x_t)
            a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
            x0_hat = x0_hat_fn(x_t, tt)
            return gaussian.target_for(pred, x0_hat, gaussian.eps_from_x0(x_t, x0_hat, a, s), a, s)

        fn = losses.make_loss_fn(SCHED, prediction=pred, weighting="min_snr", min_snr_gamma=gamma)
        values.append(np.asarray(fn(model, x0, t, noise).loss))
    np.testing.assert_allclose(values[0], values[1], rtol=1e-3)
    np.testing.assert_allclose(values[2], values[1], rtol=1e-3)


def test_vlb_loss_is_an_unbiased_estimate_of_the_full_bound():
    sched = schedules.make_schedule("linear", 200)
    oracle = GaussianMixture([1.0], [[0.0] * 4], [[1.0] * 4]).model_fn(sched)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    full = likelihood.bits_per_dim(oracle, sched, x0, jax.random.PRNGKey(1), variance="fixed_large", decoder="continuous")
    fn = jax.jit(losses.make_loss_fn(sched, objective="vlb", variance="fixed_large"), static_argnums=0)
    estimates = []
    for i in range(100):
        k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
        t = jax.random.randint(k1, (64,), 0, 200)
        estimates.append(np.asarray(fn(oracle, x0, t, jax.random.normal(k2, x0.shape)).vb))
    est = np.stack(estimates)  # [100, 64]
    stderr = est.mean(1).std() / np.sqrt(est.shape[0])
    assert abs(est.mean() - float(full["total"].mean())) < 4 * stderr + 0.05 * abs(float(full["total"].mean()))


def test_hybrid_bound_trains_only_the_variance():
    sched = schedules.make_schedule("cosine", 100)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    t = jnp.array([0, 10, 50, 99])
    out0 = jax.random.normal(jax.random.PRNGKey(2), (4, 6)) * 0.3
    hybrid = losses.make_loss_fn(sched, objective="hybrid", variance="learned_range")
    simple = losses.make_loss_fn(sched, objective="simple", variance="learned_range")
    vlb = losses.make_loss_fn(sched, objective="vlb", variance="learned_range")

    def grad(fn):
        return jax.grad(lambda out: fn(lambda x, tt: out, x0, t, noise).loss.sum())(out0)

    g_h, g_s, g_v = grad(hybrid), grad(simple), grad(vlb)
    np.testing.assert_allclose(g_h[:, :3], g_s[:, :3], rtol=1e-6)  # mean: only the simple loss
    np.testing.assert_allclose(g_h[:, 3:], 0.001 * g_v[:, 3:], rtol=1e-5)  # variance: lambda * the bound
    assert float(jnp.abs(g_v[:, :3]).sum()) > 0  # the plain bound does train the mean
    terms = hybrid(lambda x, tt: out0, x0, t, noise)
    np.testing.assert_allclose(terms.loss, terms.mse + 0.001 * terms.vb, rtol=1e-6)
    with pytest.raises(ValueError, match="learned_range"):
        losses.make_loss_fn(sched, objective="hybrid", variance="fixed_small")
    with pytest.raises(ValueError, match="unknown objective 'elbo'"):
        losses.make_loss_fn(sched, objective="elbo")


def test_importance_sampler():
    T, hist = 8, 3
    ts = losses.make_timestep_sampler("importance", T, history=hist, uniform_prob=0.0)
    state = ts.init()
    t, w = ts.sample(state, jax.random.PRNGKey(0), 4096)
    np.testing.assert_allclose(w, 1.0)  # uniform until warm
    assert len(np.unique(np.asarray(t))) == T
    # Feed losses L_t = t + 1 (constant per t): the warm sampler must pick t with p ~ (t + 1).
    update = jax.jit(ts.update)
    for _ in range(hist + 1):
        all_t = jnp.concatenate([jnp.arange(T), jnp.arange(T)])  # repeated timesteps in one batch
        state = update(state, all_t, (all_t + 1.0))
    np.testing.assert_array_equal(state["counts"], hist)
    np.testing.assert_allclose(state["losses"], np.tile(np.arange(1.0, T + 1)[:, None], (1, hist)))
    t, w = ts.sample(state, jax.random.PRNGKey(1), 100_000)
    p = np.arange(1.0, T + 1) / np.arange(1.0, T + 1).sum()
    freq = np.bincount(np.asarray(t), minlength=T) / t.shape[0]
    np.testing.assert_allclose(freq, p, atol=0.01)
    np.testing.assert_allclose(np.asarray(w), 1.0 / (T * p[np.asarray(t)]), rtol=1e-5)
    assert float(w.mean()) == pytest.approx(1.0, rel=0.02)  # E_p[1/(T p)] = 1
    uniform = losses.make_timestep_sampler("uniform", T)
    t, w = uniform.sample(uniform.init(), jax.random.PRNGKey(0), 10)
    assert t.dtype == jnp.int32 and float(w.sum()) == 10.0
