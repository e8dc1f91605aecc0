"""`likelihood.ode_log_likelihood` against the closed form for Gaussian data.

x0 ~ N(mu, Sigma) with Sigma = Q diag(lam) Q^T (rotated, so the Jacobian of the ODE's field is not
diagonal: for a diagonal one a Rademacher probe is exact and the Hutchinson interval would be 0).
Every marginal is Gaussian, x_t ~ N(alpha mu, alpha^2 Sigma + sigma^2 I), the optimal predictor is
linear, and so is the probability-flow ODE: in the eigenbasis each coordinate is rescaled by
s(t)/s(t_eps), s^2 = alpha^2 lam + sigma^2. Hence the exact answer of the ODE over the solver's
grid is log N(x_T; 0, prior_std^2) + sum log(s(t_max)/s(t_eps)), and the errors split into
  solver  = ll - that closed form (what the tests bound tightly),
  prior   = the prior N(0, prior_std^2) against the true marginal at t_max (a property of the process),
  clean   = the marginal at t_eps against the data density log N(x0; mu, Sigma).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from ldm_jax.diffusion import likelihood, processes, schedules

D, BATCH = 4, 16
_rs = np.random.default_rng(0)
Q, _ = np.linalg.qr(_rs.standard_normal((D, D)))
LAM = np.array([0.05, 0.3, 1.0, 2.0])
MU = np.array([0.5, -1.0, 0.2, 0.8])
X0 = (MU + (_rs.standard_normal((BATCH, D)) * np.sqrt(LAM)) @ Q.T).astype(np.float32)
RNG = jax.random.PRNGKey(0)

# max |ll - closed-form ODE| with the exact divergence, RK4, 100 steps; measured (nats, D = 4):
# flow 9e-5 (float32 cancellation in the oracle's eps = (x_t - alpha x0)/t at t = 1e-5), edm 1e-5,
# vdm 4e-6, discrete 5e-3 (alpha, sigma have kinks at every integer t: log sigma is piecewise linear).
SOLVER_TOL = {"flow": 1e-3, "edm": 1e-3, "vdm_fixed": 1e-4, "vdm_learned": 1e-4, "discrete": 3e-2}


def _oracle(prediction, proc, x_t, t):
    """The optimal network for the Gaussian data: E[x0 | x_t] and the matching eps, as `prediction`."""
    alpha, sigma, d_alpha, d_sigma = proc.alpha_sigma_derivatives(t)
    a, s = alpha[:, None], sigma[:, None]
    q, lam, mu = (jnp.asarray(v, jnp.float32) for v in (Q, LAM, MU))
    x0_hat = mu + (lam * a / (a**2 * lam + s**2) * ((x_t - a * mu) @ q)) @ q.T
    eps_hat = (x_t - a * x0_hat) / s
    return processes.target_for(prediction, x0_hat, eps_hat, alpha, sigma, d_alpha, d_sigma)


ORACLES = {p: functools.partial(_oracle, p) for p in processes.PREDICTIONS}  # one static function each


def _log_normal(x, mean, var_eig):
    """log N(x; mean, Q diag(var_eig) Q^T), float64."""
    z = (x - mean) @ Q
    return -0.5 * np.sum(z**2 / var_eig + np.log(2 * np.pi * var_eig), axis=-1)


def closed_form(proc, times):
    """(data, ode, marginal at t_eps) log-densities of X0 [B] for the solver's grid `times`."""
    a0, s0 = (float(v) for v in proc.alpha_sigma(jnp.float32(times[0])))
    a1, s1 = (float(v) for v in proc.alpha_sigma(jnp.float32(times[-1])))
    v0, v1 = a0**2 * LAM + s0**2, a1**2 * LAM + s1**2
    x0 = X0.astype(np.float64)
    x_end = a1 * MU + (((x0 - a0 * MU) @ Q) * np.sqrt(v1 / v0)) @ Q.T
    prior_std = float(proc.prior_std)
    log_prior = -0.5 * np.sum(x_end**2, -1) / prior_std**2 - D * np.log(np.sqrt(2 * np.pi) * prior_std)
    ode = log_prior + 0.5 * np.sum(np.log(v1 / v0))
    return _log_normal(x0, MU, LAM), ode, _log_normal(x0, a0 * MU, v0)


@pytest.fixture(scope="module")
def procs():
    vdm = processes.make_process("vdm")
    return {
        "flow": processes.make_process("flow"),
        "edm": processes.make_process("edm"),
        "vdm_fixed": processes.make_process("vdm", learned=False),
        "vdm_learned": vdm.bind(vdm.init_params(jax.random.PRNGKey(3))),
        "discrete": processes.make_process("discrete", schedule=schedules.make_schedule("scaled_linear", 1000)),
    }


# Every prediction for these (eps is refused for flow); vdm_fixed, whose conversions are vdm_learned's,
# only with velocity, to save compiles.
ALL_PREDICTIONS = ("flow", "edm", "vdm_learned", "discrete")


@pytest.fixture(scope="module")
def exact(procs):
    """ll [B] with the exact divergence, RK4, 100 steps, per (process, prediction)."""
    return {
        (name, pred): np.asarray(likelihood.ode_log_likelihood(
            Partial(ORACLES[pred], proc), proc, X0, RNG, prediction=pred, num_steps=100, divergence="exact"))
        for name, proc in procs.items() for pred in processes.PREDICTIONS
        if (pred == "velocity" or name in ALL_PREDICTIONS) and (name, pred) != ("flow", "eps")
    }


@pytest.fixture(scope="module")
def hutchinson(procs):
    """(ll, half_width) [B] with 64 Rademacher probes, velocity prediction, every process."""
    return {
        name: tuple(np.asarray(a) for a in likelihood.ode_log_likelihood(
            Partial(ORACLES["velocity"], proc), proc, X0, RNG, num_steps=100,
            divergence="hutchinson", num_probes=64, return_interval=True))
        for name, proc in procs.items()
    }


@pytest.mark.parametrize("name", ["flow", "edm", "vdm_fixed", "vdm_learned", "discrete"])
def test_exact_divergence_matches_the_closed_form(procs, exact, name):
    proc = procs[name]
    data, ode, marginal = closed_form(proc, likelihood.ode_time_grid(proc, 100))
    ll = exact[name, "velocity"]
    solver, prior, clean = np.abs(ll - ode).max(), np.abs(ode - marginal).max(), np.abs(marginal - data).max()
    print(f"{name}: |ll - data| max {np.abs(ll - data).max():.2e}; "
          f"solver {solver:.2e}, prior {prior:.2e}, clean end {clean:.2e}")
    assert solver < SOLVER_TOL[name]
    # The remaining gap to the data density is the process's own: 0 for flow (alpha(1) = 0, and
    # t_eps = 1e-5), ~0.04 for EDM (N(0, 80^2 + 1) vs N(mu, 80^2 + Sigma)), ~0.26 for VDM and ~0.21
    # for discrete (alpha(t_max) = 0.082 and 0.068 of mu survive at t_max), plus for discrete the
    # noise sigma_0 = 0.029 at its clean end t = 0. Bounded here so that a change shows.
    gap = {"flow": 1e-3, "edm": 0.05, "vdm_fixed": 0.3, "vdm_learned": 0.3, "discrete": 0.3}[name]
    assert np.abs(ll - data).max() < gap


@pytest.mark.parametrize("name", ALL_PREDICTIONS)
def test_prediction_types_give_the_same_likelihood(exact, name):
    preds = [p for p in processes.PREDICTIONS if (name, p) in exact]
    spread = max(np.abs(exact[name, p] - exact[name, "velocity"]).max() for p in preds)
    print(f"{name}: max spread over {preds}: {spread:.2e}")
    assert spread < 1e-3


@pytest.mark.parametrize("name", ["flow", "edm", "vdm_fixed", "vdm_learned", "discrete"])
def test_hutchinson_is_within_its_interval(procs, exact, hutchinson, name):
    """Against the exact-divergence answer on the same trajectory (the interval covers the probes,
    not the solver): 95% intervals on 16 examples, so allow a few misses; and against the closed
    form with the solver's tolerance added. (Here the integrated Jacobian is Q diag(log s(t_max) /
    s(t_eps)) Q^T, whose off-diagonal part, all a Rademacher probe's variance sees, is the same for
    every process: the same probes give the same spread.)"""
    proc = procs[name]
    ll, half = hutchinson[name]
    _, ode, _ = closed_form(proc, likelihood.ode_time_grid(proc, 100))
    z = (ll - exact[name, "velocity"]) / (half / 1.96)
    print(f"{name}: half_width mean {half.mean():.3f}, |z| max {np.abs(z).max():.2f}, std(z) {z.std():.2f}")
    assert np.all(half > 0)
    assert np.mean(np.abs(ll - exact[name, "velocity"]) <= half) >= 0.75
    assert np.mean(np.abs(ll - ode) <= half + SOLVER_TOL[name]) >= 0.75
    assert 0.4 < z.std() < 1.8  # the interval is neither far too narrow nor far too wide


def test_hutchinson_interval_shrinks_as_one_over_sqrt_probes(procs, hutchinson):
    proc = procs["vdm_fixed"]
    _, half_4 = likelihood.ode_log_likelihood(Partial(ORACLES["velocity"], proc), proc, X0, RNG, num_steps=100,
                                              divergence="hutchinson", num_probes=4, return_interval=True)
    halves = [np.asarray(half_4).mean(), hutchinson["vdm_fixed"][1].mean()]
    print(f"mean half-width: K=4 {halves[0]:.3f}, K=64 {halves[1]:.3f}")
    assert 2.0 < halves[0] / halves[1] < 8.0  # sqrt(64 / 4) = 4


def test_default_divergence_is_exact_up_to_64_dims(procs):
    """A random linear eps predictor: with 64 dims the default is exact (half-width 0), with 65 it
    is Hutchinson (a non-zero interval). A smoke test of the switch; the values are tested above."""
    proc = procs["vdm_fixed"]
    m = jax.random.normal(jax.random.PRNGKey(1), (65, 65)) / 8.0
    model = Partial(lambda m, x_t, t: x_t @ m[: x_t.shape[1], : x_t.shape[1]], m)
    for dims, exact_expected in ((64, True), (65, False)):
        x = jax.random.normal(jax.random.PRNGKey(2), (2, dims))
        ll, half = likelihood.ode_log_likelihood(model, proc, x, RNG, prediction="eps", num_steps=1,
                                                 num_probes=2, solver="heun", return_interval=True)
        assert np.all(np.isfinite(ll))
        assert np.all((np.asarray(half) == 0) == exact_expected)


def test_heun_converges_at_second_order(procs):
    proc = procs["vdm_fixed"]
    _, ode, _ = closed_form(proc, likelihood.ode_time_grid(proc, 25))
    errors = [np.abs(np.asarray(likelihood.ode_log_likelihood(
        Partial(ORACLES["eps"], proc), proc, X0, RNG, prediction="eps", num_steps=n, solver="heun")) - ode).max()
        for n in (25, 100)]
    print(f"heun errors: 25 steps {errors[0]:.2e}, 100 steps {errors[1]:.2e}")
    assert errors[1] < errors[0] / 8  # 16 for exactly second order
    assert errors[1] < 2e-3


def test_bits_per_dim():
    dims = 3072
    uniform = -dims * np.log(2.0)  # the uniform density on [-1, 1]^D: 8 bits per 8-bit pixel
    assert float(likelihood.nats_to_bits_per_dim(uniform, dims, pixel_data=True)) == pytest.approx(
        1 + np.log2(127.5), abs=1e-5)
    assert float(likelihood.nats_to_bits_per_dim(-dims * 2.0, dims)) == pytest.approx(2 / np.log(2), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prediction="score"), "unknown prediction 'score'; allowed: 'eps', 'x0', 'v', 'velocity'"),
    (dict(divergence="trace"), "unknown divergence 'trace'; allowed: 'exact', 'hutchinson'"),
    (dict(solver="euler"), "unknown solver 'euler'; allowed: 'heun', 'rk4'"),
    (dict(num_steps=0), "num_steps must be an integer >= 1, got 0"),
    (dict(num_probes=0), "num_probes must be an integer >= 1, got 0"),
    (dict(t_eps=1.0), r"t_eps must lie in \[t_min, t_max\) = \[0.0, 1.0\), got 1.0"),
    (dict(prediction="eps"), "prediction 'eps' is undefined at flow's t = 1"),
])
def test_bad_arguments_raise(procs, kwargs, match):
    proc = procs["flow"]
    with pytest.raises(ValueError, match=match):
        likelihood.ode_log_likelihood(Partial(ORACLES["velocity"], proc), proc, X0, RNG, **kwargs)
