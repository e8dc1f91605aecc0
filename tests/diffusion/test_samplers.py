import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from ldm_jax.diffusion import gaussian, samplers, schedules
from tests.diffusion.oracles import GaussianMixture

SCHED = schedules.make_schedule("linear", 1000)
MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [[0.1, 0.2], [0.2, 0.1], [0.15, 0.15]])
NUM_SAMPLES = 8000
# (sampler, steps, variance): the step counts at which each reproduces the mixture within tolerance.
MIXTURE_CASES = [
    ("ddpm", 1000, "fixed_small"), ("ddpm", 1000, "fixed_large"), ("ddpm", 1000, "learned_range"),
    ("ddim", 200, "fixed_small"), ("plms", 50, "fixed_small"), ("dpm_solver++", 50, "fixed_small"),
    ("euler", 200, "fixed_small"), ("heun", 50, "fixed_small"),
]
# Tolerances on the mixture's statistics (8000 samples; the data itself, sampled directly, is at
# 0.004 / 0.011 / 0.053 on these three measures).
TOL_WEIGHT, TOL_MEAN, TOL_VAR_REL = 0.02, 0.05, 0.10


def mixture_stats(x):
    labels = np.argmin(((x[:, None] - MIXTURE.means[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(labels, minlength=3) / len(x)
    means = np.stack([x[labels == k].mean(0) for k in range(3)])
    variances = np.stack([x[labels == k].var(0) for k in range(3)])
    return (np.abs(weights - MIXTURE.weights).max(), np.abs(means - MIXTURE.means).max(),
            np.abs(variances / MIXTURE.variances - 1).max())


def test_timestep_spacings():
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "leading", offset=1), np.arange(901, 0, -100))
    np.testing.assert_array_equal(samplers.timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(samplers.timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    assert len(samplers.timesteps(1000, 1000, "trailing")) == 1000
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        samplers.timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        samplers.timesteps(1000, 0)


@pytest.mark.parametrize("sampler,steps,variance", MIXTURE_CASES, ids=[f"{s}-{n}-{v}" for s, n, v in MIXTURE_CASES])
def test_every_sampler_reproduces_the_mixture(sampler, steps, variance):
    model = MIXTURE.model_fn(SCHED, "eps")
    if variance == "learned_range":  # v_net = 0: log-variance halfway between beta and beta-tilde
        model = lambda x, t, m=model: jnp.concatenate([m(x, t), jnp.zeros_like(x)], -1)  # noqa: E731
    x = samplers.sample(model, SCHED, (NUM_SAMPLES, 2), jax.random.PRNGKey(0), sampler=sampler,
                        num_steps=steps, variance=variance, spacing="trailing")
    err_w, err_m, err_v = mixture_stats(np.asarray(x))
    print(f"{sampler} {steps} {variance}: weights {err_w:.3f} means {err_m:.3f} variances {err_v:.3f}")
    assert err_w < TOL_WEIGHT and err_m < TOL_MEAN and err_v < TOL_VAR_REL


def test_prediction_types_give_the_same_trajectories():
    x_T = jax.random.normal(jax.random.PRNGKey(3), (512, 2))
    for sampler in ("ddim", "dpm_solver++", "heun"):
        runs = [samplers.sample(MIXTURE.model_fn(SCHED, p), SCHED, (512, 2), jax.random.PRNGKey(0), sampler=sampler,
                                num_steps=20, prediction=p, x_T=x_T, return_trajectory=1) for p in gaussian.PREDICTIONS]
        for x0, traj in runs[1:]:
            np.testing.assert_allclose(traj["x_t"], runs[0][1]["x_t"], atol=1e-3)
            np.testing.assert_allclose(x0, runs[0][0], atol=1e-3)


def test_ddim_is_first_order_dpm_solver_step_for_step():
    model = MIXTURE.model_fn(SCHED)
    kw = dict(num_steps=25, x_T=jax.random.normal(jax.random.PRNGKey(3), (256, 2)), return_trajectory=1)
    ddim = samplers.sample(model, SCHED, (256, 2), jax.random.PRNGKey(0), sampler="ddim", **kw)
    dpm1 = samplers.sample(model, SCHED, (256, 2), jax.random.PRNGKey(0), sampler="dpm_solver++", order=1, **kw)
    assert ddim[1]["x_t"].shape == (25, 256, 2)
    np.testing.assert_allclose(dpm1[1]["x_t"], ddim[1]["x_t"], atol=1e-5)
    np.testing.assert_allclose(dpm1[1]["pred_x0"], ddim[1]["pred_x0"], atol=1e-5)
    np.testing.assert_allclose(dpm1[0], ddim[0], atol=1e-5)


def test_ddim_eta_one_is_stochastic_and_still_correct():
    x = samplers.sample(MIXTURE.model_fn(SCHED), SCHED, (NUM_SAMPLES, 2), jax.random.PRNGKey(0), sampler="ddim",
                        num_steps=250, eta=1.0, spacing="trailing")
    err_w, err_m, err_v = mixture_stats(np.asarray(x))
    assert err_w < TOL_WEIGHT and err_m < TOL_MEAN and err_v < TOL_VAR_REL
    y = samplers.sample(MIXTURE.model_fn(SCHED), SCHED, (NUM_SAMPLES, 2), jax.random.PRNGKey(0), sampler="ddim",
                        num_steps=250, eta=0.0, spacing="trailing")
    assert float(jnp.abs(x - y).mean()) > 0.05


# ---------------------------------------------------------------- convergence on a linear-Gaussian case


@pytest.fixture(scope="module")
def gaussian_ode():
    """x0 ~ N(mu, lam): the probability-flow ODE keeps the standardised coordinate fixed, so from
    x_T at abar_T its exact endpoint is mu + sqrt(lam) (x_T - alpha_T mu) / sqrt(alpha_T^2 lam + sigma_T^2)."""
    mu, lam = 0.5, 0.3
    oracle = GaussianMixture([1.0], [[mu] * 4], [[lam] * 4]).model_fn(SCHED)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (256, 4))
    abar = SCHED.alphas_cumprod[-1]
    exact = mu + np.sqrt(lam) * (np.asarray(x_T) - np.sqrt(abar) * mu) / np.sqrt(abar * lam + 1 - abar)

    def rms_errors(sampler, steps, **kw):
        out = []
        for n in steps:
            x = samplers.sample(oracle, SCHED, x_T.shape, jax.random.PRNGKey(0), sampler=sampler, num_steps=n, x_T=x_T, **kw)
            out.append(float(np.sqrt(np.mean((np.asarray(x) - exact) ** 2))))
        return np.array(out)

    return rms_errors


STEPS = np.array([25, 50, 100, 200])


@pytest.mark.parametrize("sampler,kw,lo,hi", [
    ("ddim", dict(spacing="linspace"), -1.15, -0.85),
    ("euler", dict(karras_sigmas=True), -1.15, -0.85),
    ("dpm_solver++", dict(spacing="linspace"), -2.3, -1.8),
    ("heun", dict(karras_sigmas=True), -2.6, -1.9),
])
def test_error_falls_at_the_sampler_order(gaussian_ode, sampler, kw, lo, hi):
    errors = gaussian_ode(sampler, STEPS, **kw)
    slope = np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    print(sampler, errors, f"slope {slope:.2f}")
    assert lo < slope < hi


def test_plms_beats_first_order_at_every_step_count(gaussian_ode):
    plms, ddim = gaussian_ode("plms", STEPS, spacing="linspace"), gaussian_ode("ddim", STEPS, spacing="linspace")
    print("plms", plms, "ddim", ddim)
    assert np.all(plms < ddim / 10)


# ---------------------------------------------------------------- guidance and compilation


def test_classifier_free_guidance_is_one_batched_call():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context[:, :1] + t[:, None] * context[:, 1:]

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    t = jnp.array([5.0, 6.0, 7.0])
    cond, uncond = jnp.array([[2.0, 1.0]] * 3), jnp.array([[0.5, -1.0]] * 3)
    guided = samplers.classifier_free_guidance(model, cond, uncond, 4.0)
    out = guided(x, t)
    assert calls == [6]
    c, u = model(x, t, cond), model(x, t, uncond)
    np.testing.assert_allclose(out, u + 4.0 * (c - u), rtol=1e-6)
    # Guidance rescale: phi * (guided rescaled to std(cond)) + (1 - phi) * guided.
    phi = 0.7
    g = np.asarray(u + 4.0 * (c - u))
    rescaled = g * np.asarray(c).std(1, keepdims=True) / g.std(1, keepdims=True)
    out = samplers.classifier_free_guidance(model, cond, uncond, 4.0, guidance_rescale=phi)(x, t)
    np.testing.assert_allclose(out, phi * rescaled + (1 - phi) * g, rtol=1e-5)


def test_sample_compiles_once_per_sampler_steps_and_shape():
    traces = []

    def model(x, t, context):
        traces.append(1)  # runs only while tracing
        return x * context[:, :1]

    for sampler, traced_calls in (("ddim", 1), ("plms", 2), ("heun", 2)):
        traces.clear()
        for seed, scale in ((0, 2.0), (1, 3.0), (2, 7.5)):
            guided = samplers.classifier_free_guidance(model, jnp.ones((2, 1)) * seed, jnp.zeros((2, 1)), scale)
            samplers.sample(guided, SCHED, (2, 4), jax.random.PRNGKey(seed), sampler=sampler, num_steps=10, eta=0.1 * seed)
        assert len(traces) == traced_calls, sampler
    traces.clear()
    guided = samplers.classifier_free_guidance(model, jnp.ones((2, 1)), jnp.zeros((2, 1)), 2.0)
    samplers.sample(guided, SCHED, (2, 4), jax.random.PRNGKey(0), sampler="ddim", num_steps=11)
    samplers.sample(guided, SCHED, (2, 4), jax.random.PRNGKey(0), sampler="ddim", num_steps=11)
    assert len(traces) == 1  # a new step count compiles once


def test_sample_works_inside_jit_and_with_partial_models():
    model = Partial(lambda scale, x, t: x * scale, jnp.float32(0.5))
    fn = jax.jit(lambda rng: samplers.sample(model, SCHED, (2, 3), rng, sampler="dpm_solver++", num_steps=5, prediction="x0"))
    out = fn(jax.random.PRNGKey(0))
    assert out.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_trajectory_records_every_kth_step():
    x0, traj = samplers.sample(MIXTURE.model_fn(SCHED), SCHED, (4, 2), jax.random.PRNGKey(0), sampler="ddim",
                               num_steps=10, return_trajectory=4)
    assert traj["x_t"].shape == (3, 4, 2) and traj["pred_x0"].shape == (3, 4, 2)
    np.testing.assert_array_equal(traj["t"], samplers.timesteps(1000, 10)[::4])
    full = samplers.sample(MIXTURE.model_fn(SCHED), SCHED, (4, 2), jax.random.PRNGKey(0), sampler="ddim",
                           num_steps=10, return_trajectory=1)[1]
    np.testing.assert_allclose(traj["x_t"], full["x_t"][::4], rtol=1e-6)


def test_zero_terminal_snr_with_v_prediction():
    """abar_T = 0: x_T is pure noise and carries no information about x_0, so every sampler's
    first predicted x_0 is the data's mean, whatever x_T (the oracle's v there is -E[x_0]). The
    deterministic samplers' probability-flow ODE of x_0 ~ N(mu, lam) ends exactly at
    mu + sqrt(lam) x_T (the standardised coordinate is constant, and at abar_T = 0 it is x_T);
    the stochastic one (ddpm) and euler reproduce the mixture's weights, means and variances
    (2000 samples, whose own variances are ~0.08 off)."""
    sched = schedules.make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    assert sched.alphas_cumprod[-1] == 0.0

    def run(data, shape, sampler, steps, **kw):
        """(x_0, the first step's predicted x_0)"""
        x, first = samplers.sample(data.model_fn(sched, "v"), sched, shape, jax.random.PRNGKey(0), sampler=sampler,
                                   num_steps=steps, prediction="v", spacing="trailing", return_trajectory=steps, **kw)
        assert int(first["t"][0]) == 999
        return np.asarray(x), np.asarray(first["pred_x0"][0])

    mu, lam = 0.5, 0.3
    x_T = jax.random.normal(jax.random.PRNGKey(1), (256, 4))
    exact = mu + np.sqrt(lam) * np.asarray(x_T)
    # 50 steps: first order (ddim) is at 0.033, second order (dpm_solver++) at 0.015.
    for sampler, tol in (("ddim", 0.05), ("dpm_solver++", 0.025)):
        x, pred_x0 = run(GaussianMixture([1.0], [[mu] * 4], [[lam] * 4]), x_T.shape, sampler, 50, x_T=x_T)
        np.testing.assert_allclose(pred_x0, mu, atol=1e-5, err_msg=sampler)
        assert np.sqrt(np.mean((x - exact) ** 2)) < tol, sampler

    for sampler, steps in (("ddpm", 1000), ("euler", 100)):
        x, pred_x0 = run(MIXTURE, (2000, 2), sampler, steps)
        # Euler's sigma_max stays finite (abar 2^-24 at t = T, as diffusers): x_T says next to nothing.
        np.testing.assert_allclose(pred_x0, np.broadcast_to(MIXTURE.weights @ MIXTURE.means, (2000, 2)), atol=2e-3,
                                   err_msg=sampler)
        err_w, err_m, err_v = mixture_stats(x)
        assert err_w < 0.03 and err_m < 0.06 and err_v < 0.15, (sampler, err_w, err_m, err_v)


def test_bad_sampler_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*'dpm_solver\\+\\+'"):
        samplers.sample(lambda x, t: x, SCHED, (1, 2), jax.random.PRNGKey(0), sampler="dpm")
    with pytest.raises(ValueError, match="unknown prediction"):
        samplers.sample(lambda x, t: x, SCHED, (1, 2), jax.random.PRNGKey(0), prediction="noise")
    with pytest.raises(ValueError, match="x_T has shape"):
        samplers.sample(lambda x, t: x, SCHED, (1, 2), jax.random.PRNGKey(0), x_T=jnp.zeros((2, 2)))
