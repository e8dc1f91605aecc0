"""Closed-form checks of the continuous-process objectives (`losses.make_process_loss_fn`) and
their time samplers (`losses.make_process_time_sampler`).

Gaussian data x0 ~ N(mu, diag lam) under x_t = alpha x0 + sigma eps has everything in closed form:
  E[x0 | x_t] = mu + lam alpha / (alpha^2 lam + sigma^2) (x_t - alpha mu),
  Var(x0 | x_t) = lam sigma^2 / (alpha^2 lam + sigma^2) per dim,
and, every target being affine in x0 at fixed x_t (`processes.x0_error_scale`: target - E[target |
x_t] = c (x0 - E[x0 | x_t])), Var(target | x_t) = c^2 Var(x0 | x_t): the irreducible L_simple.

VDM's bound with the optimal eps predictor: by I-MMSE (dI/dsnr = mmse_x / 2) the diffusion term
1/2 int gamma' E||eps - eps_hat||^2 dt = 1/2 int mmse_x dsnr = I(x; z_0) - I(x; z_1), so
  E[bound] = H(x) + E KL(q(x | z_0) || p(x | z_0)) + KL(q(z_1) || N(0, I))
           = H(x) + sum_d [1/2 log(1 + e^gamma_0 / lam)
                           + 1/2 (v - 1 - log v + alpha_1^2 mu^2)],  v = alpha_1^2 lam + sigma_1^2,
with the decoder N(x; z_0/alpha_0, e^gamma_0): the bound sits above the entropy by exactly the decoder
and prior gaps, a number the tests compare to.

Run with -s to see the measured numbers.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.diffusion import losses, processes

MU = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
LAM = np.array([0.25, 0.5, 1.0, 2.0], np.float32)
D = MU.size
BPD = 1.0 / (D * math.log(2.0))  # nats -> bits/dim


def _vdm(gamma_min=-13.3, gamma_max=5.0, features=1024, seed=0):
    """A learned VDM process bound to freshly initialised gamma parameters."""
    proc = processes.make_process("vdm", gamma_min=gamma_min, gamma_max=gamma_max)
    return proc.bind(processes.vdm_gamma_init(jax.random.PRNGKey(seed), gamma_min, gamma_max, features))


# VDM's gamma network at a width of 16 (1024 by default) where only the schedule's values matter: the
# per-example network dominates the cost on CPU; the tests that train it use the default width.
PROCS = {"flow": processes.make_process("flow"), "edm": processes.make_process("edm"), "vdm": _vdm(features=16)}


def gaussian_denoiser(proc, prediction, mu=MU, lam=LAM, shrink=1.0, offset=0.0):
    """model_fn(x_t [B, D], t [B]) -> `prediction`: the optimal one for N(mu, diag lam) data, or with
    shrink/offset the deliberately wrong x0_hat = shrink E[x0 | x_t] + offset (with the eps that
    x_t implies for it)."""

    def fn(x_t, t):
        alpha, sigma, d_alpha, d_sigma = proc.alpha_sigma_derivatives(t)
        a, s = alpha[:, None], sigma[:, None]
        den = a**2 * lam + s**2
        x0 = mu + lam * a / den * (x_t - a * mu)
        if shrink == 1.0 and offset == 0.0:
            eps = s / den * (x_t - a * mu)  # = (x_t - a x0)/s without its cancellation at small sigma
        else:
            x0 = shrink * x0 + offset
            eps = (x_t - a * x0) / s
        return processes.target_for(prediction, x0, eps, alpha, sigma, d_alpha, d_sigma)

    return fn


def _data(n, seed, mu=MU, lam=LAM):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x0 = mu + np.sqrt(lam) * jax.random.normal(k1, (n, mu.size))
    return x0, jax.random.normal(k2, (n, mu.size))


# ----------------------------------------------------------------------------- 1. irreducible loss

TIMES = {"flow": (0.1, 0.5, 0.9), "edm": (0.05, 0.8, 5.0), "vdm": (0.3, 0.6, 0.9)}


@pytest.mark.parametrize("prediction", processes.PREDICTIONS)
@pytest.mark.parametrize("name", ["flow", "edm", "vdm"])
def test_optimal_predictor_attains_the_irreducible_loss(name, prediction):
    """Mean mse of E[target | x_t] = c^2 lam sigma^2/(alpha^2 lam + sigma^2) (mean over dims), within
    5 standard errors; flow/velocity, edm/x0 and vdm/eps are the pairings those processes train."""
    proc, n = PROCS[name], 20_000
    x0, noise = _data(n, seed=1)
    loss_fn = losses.make_process_loss_fn(proc, prediction=prediction)
    for t in TIMES[name]:
        terms = loss_fn(gaussian_denoiser(proc, prediction), proc, x0, jnp.full((n,), t), noise)
        alpha, sigma, d_alpha, d_sigma = (float(v) for v in proc.alpha_sigma_derivatives(jnp.float32(t)))
        c = float(processes.x0_error_scale(prediction, alpha, sigma, d_alpha, d_sigma))
        want = np.mean(c**2 * LAM * sigma**2 / (alpha**2 * LAM + sigma**2))
        mse = np.asarray(terms.mse, np.float64)
        se = mse.std() / math.sqrt(n)
        print(f"\n{name:4s} {prediction:8s} t={t:<4} mse {mse.mean():.5g} closed form {want:.5g} "
              f"({(mse.mean() - want) / se:+.1f} se)", end="")
        assert abs(mse.mean() - want) <= 5 * se, (name, prediction, t)
        np.testing.assert_allclose(terms.loss, terms.mse)  # weighting "none"
        np.testing.assert_array_equal(terms.vb, 0.0)


# ----------------------------------------------------------------------------- 2. weights in x0-space


def _wrong_model_losses(proc, weighting, times, **kw):
    """({prediction: loss [B]} for the same (x0, t, noise) and the same wrong x0_hat, and
    mean over dims of (x0 - x0_hat)^2 [B])."""
    x0, noise = _data(times.size, seed=2)
    out = {}
    for prediction in processes.PREDICTIONS:
        loss_fn = losses.make_process_loss_fn(proc, prediction=prediction, weighting=weighting, **kw)
        model = gaussian_denoiser(proc, prediction, shrink=0.5, offset=0.3)
        out[prediction] = np.asarray(loss_fn(model, proc, x0, times, noise).loss)
    alpha, sigma = proc.alpha_sigma(times)
    x_t = alpha[:, None] * x0 + sigma[:, None] * noise
    x0_hat = gaussian_denoiser(proc, "x0", shrink=0.5, offset=0.3)(x_t, times)
    return out, np.mean((np.asarray(x0) - np.asarray(x0_hat)) ** 2, axis=-1)


UNIT_TIMES = jnp.linspace(0.02, 0.98, 49)


@pytest.mark.parametrize("name", ["flow", "vdm"])
def test_min_snr_is_one_weight_in_x0_space(name):
    proc, gamma = PROCS[name], 5.0
    out, x0_err = _wrong_model_losses(proc, "min_snr", UNIT_TIMES, min_snr_gamma=gamma)
    for prediction in ("eps", "v", "velocity"):
        np.testing.assert_allclose(out[prediction], out["x0"], rtol=1e-5, err_msg=prediction)
    alpha, sigma = (np.asarray(v, np.float64) for v in proc.alpha_sigma(UNIT_TIMES))
    snr = alpha**2 / sigma**2
    assert snr.min() < gamma < snr.max()  # both sides of the clamp
    np.testing.assert_allclose(out["x0"], np.minimum(snr, gamma) * x0_err, rtol=1e-5)


@pytest.mark.parametrize("name", ["edm", "flow", "vdm"])
def test_edm_weight_is_one_weight_in_x0_space(name):
    """lambda(sigma) ||x0 - x0_hat||^2 with lambda = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2 and
    sigma = sigma/alpha (EDM's variance-exploding noise level), whatever the prediction."""
    proc, sigma_data = PROCS[name], 0.5
    times = jnp.asarray(np.geomspace(0.01, 50.0, 49), jnp.float32) if name == "edm" else UNIT_TIMES
    out, x0_err = _wrong_model_losses(proc, "edm", times, sigma_data=sigma_data)
    for prediction in ("eps", "v", "velocity"):
        np.testing.assert_allclose(out[prediction], out["x0"], rtol=1e-5, err_msg=prediction)
    alpha, sigma = (np.asarray(v, np.float64) for v in proc.alpha_sigma(times))
    s = sigma / alpha
    lam = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    np.testing.assert_allclose(out["x0"], lam * x0_err, rtol=1e-5)


# ----------------------------------------------------------------------------- 3. sd3, refusals


def test_sd3_cosmap_weight_and_refusals():
    proc = PROCS["flow"]
    x0, noise = _data(49, seed=3)
    model = gaussian_denoiser(proc, "velocity", shrink=0.5, offset=0.3)
    terms = losses.make_process_loss_fn(proc, weighting="sd3")(model, proc, x0, UNIT_TIMES, noise)
    t = np.asarray(UNIT_TIMES, np.float64)
    np.testing.assert_allclose(terms.loss, 2.0 / (math.pi * (1 - 2 * t + 2 * t**2)) * terms.mse, rtol=1e-6)
    assert float(terms.loss[24]) == pytest.approx(4.0 / math.pi * float(terms.mse[24]), rel=1e-6)  # t = 1/2

    for name in ("edm", "vdm"):
        with pytest.raises(ValueError, match=rf"'sd3'.*'flow'.*'{name}'"):
            losses.make_process_loss_fn(PROCS[name], weighting="sd3")
    for name in ("flow", "edm"):
        with pytest.raises(ValueError, match=rf"'vlb'.*'vdm'.*'{name}'"):
            losses.make_process_loss_fn(PROCS[name], objective="vlb")
    with pytest.raises(ValueError, match=r"weighting 'p2'.*'min_snr'.*'sd3'"):
        losses.make_process_loss_fn(PROCS["flow"], weighting="p2")


# ----------------------------------------------------------------------------- 4. VDM's bound


def _bound_vs_entropy(proc, n, seed):
    """Per-example (vb - nll) in bits/dim, and the same minus a zero-mean control variate: the
    diffusion term's chi-square noise, 1/2 gamma'(t) sum_d [(eps - eps_hat)^2 - mmse_eps], whose
    mean is exactly 0 given t (eps - eps_hat ~ N(0, mmse_eps) for the optimal predictor). The
    control variate leaves the estimate's mean unchanged (a wrong diffusion term still shows) and
    cuts its noise by about half. Also the mean nll."""
    loss_fn = losses.make_process_loss_fn(proc, objective="vlb", prediction="eps", decoder="continuous")

    @jax.jit
    def run(proc, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = MU + np.sqrt(LAM) * jax.random.normal(k1, (n, D))
        noise = jax.random.normal(k2, (n, D))
        t = jax.random.uniform(k3, (n,))
        model = gaussian_denoiser(proc, "eps")
        terms = loss_fn(model, proc, x0, t, noise)
        nll = jnp.sum(0.5 * jnp.log(2 * jnp.pi * LAM) + 0.5 * (x0 - MU) ** 2 / LAM, axis=-1) * BPD
        alpha, sigma = proc.alpha_sigma(t)
        a, s = alpha[:, None], sigma[:, None]
        eps_hat = model(a * x0 + s * noise, t)
        mmse_eps = LAM * a**2 / (LAM * a**2 + s**2)
        d_gamma = jax.jvp(proc.gamma, (t,), (jnp.ones_like(t),))[1]
        control = 0.5 * d_gamma * jnp.sum((noise - eps_hat) ** 2 - mmse_eps, axis=-1) * BPD
        return terms.vb - nll, terms.vb - nll - control, nll

    gap, gap_cv, nll = (np.asarray(v, np.float64) for v in run(proc, jax.random.PRNGKey(seed)))
    return gap, gap_cv, nll.mean()


def _closed_form_gap(proc):
    """Decoder + prior gaps above the entropy, bits/dim (module docstring)."""
    g0, g1 = (np.float64(v) for v in proc.gamma(jnp.array([0.0, 1.0])))
    a1, s1 = 1 / (1 + np.exp(g1)), 1 / (1 + np.exp(-g1))  # alpha_1^2, sigma_1^2
    v = a1 * LAM + s1
    prior = 0.5 * (v - 1 - np.log(v) + a1 * MU.astype(np.float64) ** 2)
    decoder = 0.5 * np.log1p(np.exp(g0) / LAM)
    return float(np.sum(prior + decoder) * BPD), float(np.sum(prior) * BPD)


@pytest.mark.parametrize("endpoints", [
    (-4.0, 1.0),  # a short range: prior and decoder gaps large enough to resolve
    (-13.3, 5.0),  # VDM's initial schedule: gaps of ~0.008 bits/dim, within the MC error
])
def test_vdm_bound_of_the_optimal_denoiser_is_the_entropy_plus_the_endpoint_gaps(endpoints):
    """E[vb] - H(x) = the closed-form decoder + prior gaps, and >= 0: 10^6 samples of (x0, eps, t)."""
    n = 1_000_000
    proc = _vdm(*endpoints, features=16)
    gap, gap_cv, nll = _bound_vs_entropy(proc, n, seed=4)
    want, prior = _closed_form_gap(proc)
    se, se_cv = gap.std() / math.sqrt(n), gap_cv.std() / math.sqrt(n)
    print(f"\nvdm gamma {endpoints}: nll {nll:.4f} bpd; vb - nll {gap.mean():.4f} +- {se:.4f} raw, "
          f"{gap_cv.mean():.4f} +- {se_cv:.4f} with control variate; closed form {want:.4f} "
          f"(prior {prior:.4f})")
    assert gap.mean() >= -5 * se  # a bound: never below the true nll
    assert abs(gap.mean() - want) <= 5 * se
    assert abs(gap_cv.mean() - want) <= 5 * se_cv


def test_vdm_bound_trains_the_schedule_endpoints():
    """The bound's gradient reaches gamma's parameters, finite everywhere, nonzero for the linear
    layer that sets the endpoints (its bias and slope)."""
    proc = processes.make_process("vdm")
    proc = proc.bind(proc.init_params(jax.random.PRNGKey(0)))
    loss_fn = losses.make_process_loss_fn(proc, objective="vlb", prediction="eps")
    x0, noise = _data(2048, seed=5)
    t = jax.random.uniform(jax.random.PRNGKey(6), (2048,))

    def bound(params):
        p = proc.bind(params)
        return loss_fn(gaussian_denoiser(p, "eps"), p, x0, t, noise).loss.mean()

    grads = jax.jit(jax.grad(bound))(proc.params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
    print(f"\nd bound / d l1: bias {float(grads['l1']['bias'][0]):.4g}, "
          f"kernel {float(grads['l1']['kernel'][0, 0]):.4g}")
    assert abs(float(grads["l1"]["bias"][0])) > 1e-4
    assert abs(float(grads["l1"]["kernel"][0, 0])) > 1e-4


# ----------------------------------------------------------------------------- 5. training gamma


def test_vdm_schedule_stays_monotone_and_learns_its_endpoints():
    """A linear-in-x_t eps predictor of the Gaussian form (mean and log-variance, 4 parameters) and
    VDM's gamma network, trained together on the bound for 200 adam steps on 2-D data N(mu, 0.05).

    Which way the endpoints go, with the predictor near optimal (module docstring):
    - gamma(1): d/dgamma_1 KL(q(z_1) || N(0, I)) = -1/2 alpha_1^2 sigma_1^2 sum[mu^2 + (1 - lam)^2
      alpha_1^2 / v] < 0, so gamma(1) rises (sigma_1 -> 1); the data mean is far from 0 (|mu|^2 =
      6.25) so that this force (~0.02 nats) stands out of the gradient noise.
    - gamma(0): d/dgamma_0 1/2 sum log(1 + e^gamma_0 / lam) = ~3e-5 nats at gamma_0 = -13.3: the
      decoder wants sigma_0/alpha_0 small relative to the data's std, and at e^gamma_0 / lam ~ 3e-5
      it already is. With no force of its own, gamma(0) only drifts with the bias it shares with
      gamma(1) (gamma(0) = b + ..., gamma(1) = b + |k| + ...) and the gradient noise, either way.
    Measured over 11 data/time streams: d gamma(1) = +0.44..+0.86, d gamma(0) = -0.11..+0.31 (this
    one: +0.86, +0.03); so the test asserts gamma(1)'s rise, and that gamma(0) stays within its drift.
    """
    mu, lam, batch = np.array([2.0, -1.5], np.float32), np.array([0.05, 0.05], np.float32), 512
    proc = processes.make_process("vdm")
    loss_fn = losses.make_process_loss_fn(proc, objective="vlb", prediction="eps")

    def model(params, p):
        def fn(x_t, t):
            alpha, sigma = p.alpha_sigma(t)
            a, s = alpha[:, None], sigma[:, None]
            lam_hat = jnp.exp(params["log_lam"])
            return s / (a**2 * lam_hat + s**2) * (x_t - a * params["mu"])

        return fn

    params = {"model": {"mu": jnp.zeros(2), "log_lam": jnp.zeros(2)},
              "process": proc.init_params(jax.random.PRNGKey(0))}
    # the 4-parameter predictor learns faster (0.1) so that the schedule sees a near-optimal one
    opt = optax.multi_transform({"model": optax.adam(0.1), "process": optax.adam(1e-2)},
                                {"model": "model", "process": "process"})
    opt_state = opt.init(params)

    def objective(params, key):
        k1, k2, k3 = jax.random.split(key, 3)
        p = proc.bind(params["process"])
        x0 = mu + np.sqrt(lam) * jax.random.normal(k1, (batch, 2))
        noise = jax.random.normal(k2, (batch, 2))
        t = jax.random.uniform(k3, (batch,))
        return loss_fn(model(params["model"], p), p, x0, t, noise).loss.mean()

    @jax.jit
    def step(params, opt_state, key):
        grads = jax.grad(objective)(params, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grid = jnp.linspace(0.0, 1.0, 1001)
    start = np.asarray(proc.bind(params["process"]).gamma(jnp.array([0.0, 1.0])))
    for i in range(200):
        params, opt_state = step(params, opt_state, jax.random.fold_in(jax.random.PRNGKey(1), i))
        if (i + 1) % 50 == 0:
            gamma = np.asarray(proc.bind(params["process"]).gamma(grid))
            assert np.all(np.diff(gamma) >= 0), f"gamma decreases somewhere after {i + 1} steps"
    end = gamma[[0, -1]]
    moved = end - start
    print(f"\ngamma(0) {start[0]:.3f} -> {end[0]:.3f} ({moved[0]:+.3f}), gamma(1) {start[1]:.3f} -> "
          f"{end[1]:.3f} ({moved[1]:+.3f}); model mu {np.asarray(params['model']['mu'])}, "
          f"lam {np.exp(np.asarray(params['model']['log_lam']))}")
    np.testing.assert_allclose(params["model"]["mu"], mu, atol=0.15)  # the predictor did converge
    assert moved[1] > 0.3  # gamma(1) learned, towards the prior
    assert abs(moved[0]) < 0.4  # gamma(0): only drift (a wrong decoder term would push it hard)


# ----------------------------------------------------------------------------- 6. time samplers

N_T = 100_000


def _sample(name, proc, seed=0, **kw):
    t, w = losses.make_process_time_sampler(name, proc, **kw).sample({}, jax.random.PRNGKey(seed), N_T)
    np.testing.assert_array_equal(w, 1.0)
    return np.asarray(t, np.float64)


def _assert_normal(x, mean, std, what):
    """Sample mean and std within 5 standard errors (std's se: std/sqrt(2n))."""
    n = x.size
    print(f"\n{what}: mean {x.mean():.4f} (want {mean}), std {x.std():.4f} (want {std})", end="")
    assert abs(x.mean() - mean) <= 5 * std / math.sqrt(n), what
    assert abs(x.std() - std) <= 5 * std / math.sqrt(2 * n), what


def _logit(t):
    return np.log(t / (1 - t))


def test_logit_normal_sampler():
    m, s = 0.4, 0.8
    t = _sample("logit_normal", PROCS["flow"], logit_mean=m, logit_std=s)
    _assert_normal(_logit(t), m, s, "flow logit_normal: logit(t)")
    # the flow shift is applied to the same draws
    shifted = _sample("logit_normal", processes.make_process("flow", shift=3.0), logit_mean=m, logit_std=s)
    np.testing.assert_allclose(shifted, processes.shift_time(t, 3.0), rtol=1e-5, atol=1e-6)
    assert np.median(shifted) > np.median(t) + 0.2  # more time at high noise
    # VDM's t is in [0, 1] too
    _assert_normal(_logit(_sample("logit_normal", PROCS["vdm"], logit_mean=m, logit_std=s)), m, s, "vdm logit(t)")
    with pytest.raises(ValueError, match=r"'logit_normal'.*'edm'.*0\.002.*80"):
        losses.make_process_time_sampler("logit_normal", PROCS["edm"])


def test_lognormal_sampler():
    p_mean, p_std = -1.2, 1.2
    for name in ("edm", "flow"):
        proc = PROCS[name]
        t = _sample("lognormal", proc, p_mean=p_mean, p_std=p_std)
        alpha, sigma = (np.asarray(v, np.float64) for v in proc.alpha_sigma(jnp.asarray(t, jnp.float32)))
        _assert_normal(np.log(sigma / alpha), p_mean, p_std, f"{name} lognormal: ln(sigma/alpha)")
    # a learned VDM schedule moves under the sampler, which never sees it: refused at once
    with pytest.raises(ValueError, match=r"'lognormal'.*'vdm'"):
        losses.make_process_time_sampler("lognormal", processes.make_process("vdm"))
    fixed = processes.make_process("vdm", learned=False)
    t = _sample("lognormal", fixed, p_mean=-3.0, p_std=1.0)  # ln(sigma/alpha) = gamma/2 in [-6.65, 2.5]
    _assert_normal(np.asarray(fixed.gamma(jnp.asarray(t, jnp.float32)), np.float64) / 2, -3.0, 1.0,
                   "fixed vdm lognormal: gamma/2")


def test_uniform_sampler():
    for name, proc in PROCS.items():
        t = _sample("uniform", proc)
        lo, hi = proc.t_min, proc.t_max
        print(f"\n{name} uniform: [{t.min():.4g}, {t.max():.4g}] mean {t.mean():.4f} (want {(lo + hi) / 2})", end="")
        assert lo <= t.min() and t.max() <= hi
        assert abs(t.mean() - (lo + hi) / 2) <= 5 * (hi - lo) / math.sqrt(12 * N_T)


def test_flow_times_stay_inside_the_open_interval():
    """eps and x0 targets divide by alpha = 1 - t and sigma = t: no sampler may return 0 or 1, even
    from distributions that pile up at the ends."""
    flow = PROCS["flow"]
    for name, kw in [("uniform", {}), ("logit_normal", dict(logit_std=30.0)), ("lognormal", dict(p_std=30.0))]:
        t = _sample(name, flow, **kw)
        assert 0.0 < t.min() and t.max() < 1.0, name
        if name != "uniform":  # the wide ones do reach the clip at both ends
            assert t.min() < 1e-4 and t.max() > 1 - 1e-4, name
