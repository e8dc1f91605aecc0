"""`processes`: every process's noise levels, derivatives, log-SNR inverse and time grid against their
closed forms; prediction conversions for every process; processes as jit arguments; VDM's
learned gamma stays monotone; `make_process`'s errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import processes, schedules

SCHED = schedules.make_schedule("linear", 1000)
_VDM = processes.make_process("vdm")
PROCS = {
    "flow": processes.make_process("flow"),
    "flow_shift3": processes.make_process("flow", shift=3.0),
    "edm": processes.make_process("edm"),
    "vdm_fixed": processes.make_process("vdm", learned=False),
    "vdm_learned": _VDM.bind(_VDM.init_params(jax.random.PRNGKey(0))),
    "discrete": processes.make_process("discrete", schedule=SCHED),
}
PREDICTIONS = processes.PREDICTIONS


def interior_times(proc, n=64, seed=0):
    """Random times away from the ends (where eps or x0 stops being defined): log-uniform sigma in
    [0.01, 50] for EDM, 2%..98% of the interval otherwise (fractional for the discrete process)."""
    u = np.random.default_rng(seed).uniform(0.02, 0.98, n)
    if proc.name == "edm":
        return jnp.asarray(np.exp(np.log(0.01) + u * np.log(50 / 0.01)), jnp.float32)
    return jnp.asarray(proc.t_min + u * (proc.t_max - proc.t_min), jnp.float32)


def random_pair(n, d=3, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (n, d)), jax.random.normal(k2, (n, d))


# ---------------------------------------------------------------- predictions


@pytest.mark.parametrize("name", list(PROCS))
def test_every_prediction_converts_to_every_other(name):
    """target_for(p) then to_x0_eps(p) returns (x0, eps), and target_for(q) of that is q's target,
    for every pair (p, q), at random t (float32 round-off only; the worst case is x0 from eps at
    the noisiest times, eps from x0 at the cleanest)."""
    proc = PROCS[name]
    t = interior_times(proc)
    x0, eps = random_pair(t.shape[0])
    levels = proc.alpha_sigma_derivatives(t)
    a, s = levels[0][:, None], levels[1][:, None]
    x_t = a * x0 + s * eps
    worst = 0.0
    for p, q in itertools.product(PREDICTIONS, PREDICTIONS):
        out = processes.target_for(p, x0, eps, *levels)
        x0_back, eps_back = processes.to_x0_eps(p, out, x_t, *levels)
        want, got = processes.target_for(q, x0, eps, *levels), processes.target_for(q, x0_back, eps_back, *levels)
        # scale: the size of the terms the conversion subtracts
        scale = 1.0 + jnp.abs(x_t) / jnp.minimum(a, s) + jnp.abs(want)
        err = float(jnp.max(jnp.abs(got - want) / scale))
        worst = max(worst, err)
        assert err < 1e-5, (p, q, err)
    print(f"{name}: worst relative round-trip error {worst:.1e}")


def test_prediction_errors_name_the_choices():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="unknown prediction 'noise'; allowed: 'eps', 'x0', 'v', 'velocity'"):
        processes.to_x0_eps("noise", x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        processes.target_for("noise", x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="velocity prediction needs the time derivatives"):
        processes.to_x0_eps("velocity", x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="velocity prediction needs the time derivatives"):
        processes.target_for("velocity", x, x, 0.5, 0.5)


@pytest.mark.parametrize("name", list(PROCS))
def test_x0_error_scale_is_the_ratio_of_errors_at_fixed_x_t(name):
    """|target(x0, eps) - target(x0_hat, eps_hat)| = c |x0 - x0_hat| with eps_hat = (x_t - alpha x0_hat)/sigma."""
    proc = PROCS[name]
    t = interior_times(proc, seed=2)
    x0, eps = random_pair(t.shape[0], seed=3)
    x0_hat = x0 + 0.1 * random_pair(t.shape[0], seed=4)[0]
    levels = proc.alpha_sigma_derivatives(t)
    a, s = levels[0][:, None], levels[1][:, None]
    eps_hat = (a * x0 + s * eps - a * x0_hat) / s
    for p in PREDICTIONS:
        diff = processes.target_for(p, x0, eps, *levels) - processes.target_for(p, x0_hat, eps_hat, *levels)
        ratio = jnp.linalg.norm(diff, axis=1) / jnp.linalg.norm(x0 - x0_hat, axis=1)
        np.testing.assert_allclose(ratio, processes.x0_error_scale(p, *levels), rtol=2e-3, err_msg=p)


# ---------------------------------------------------------------- noise levels


def test_alpha_sigma_match_the_closed_forms():
    t = np.linspace(0.0, 1.0, 101)
    for proc in (PROCS["flow"], PROCS["flow_shift3"]):  # the shift moves the grid, not alpha(t)
        a, s = proc.alpha_sigma(jnp.asarray(t, jnp.float32))
        np.testing.assert_allclose(a, 1 - t, atol=1e-7)
        np.testing.assert_allclose(s, t, atol=1e-7)
    sig = np.geomspace(0.002, 80.0, 50)
    a, s = PROCS["edm"].alpha_sigma(jnp.asarray(sig, jnp.float32))
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_allclose(s, sig, rtol=1e-7)

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    gamma = -13.3 + 18.3 * t  # linear between gamma_min and gamma_max
    a, s = PROCS["vdm_fixed"].alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(a**2, sigmoid(-gamma), rtol=1e-5)
    np.testing.assert_allclose(s**2, sigmoid(gamma), rtol=1e-5)
    learned = PROCS["vdm_learned"]
    gamma = np.asarray(processes.vdm_gamma(learned.params, jnp.asarray(t, jnp.float32)), np.float64)
    a, s = learned.alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(a**2, sigmoid(-gamma), rtol=1e-5)
    np.testing.assert_allclose(s**2, sigmoid(gamma), rtol=1e-5)
    np.testing.assert_allclose(learned.log_snr(jnp.asarray(t, jnp.float32)), -gamma, rtol=1e-6)

    disc = PROCS["discrete"]
    ts = jnp.asarray([-1, 0, 1, 500, 999], jnp.int32)
    a, s = disc.alpha_sigma(ts)
    abar = np.append(1.0, SCHED.alphas_cumprod[[0, 1, 500, 999]])
    np.testing.assert_allclose(a, np.sqrt(abar), rtol=1e-6)
    np.testing.assert_allclose(s, np.sqrt(1 - abar), atol=1e-6)  # sqrt(1 - abar) in float32 at abar ~ 1
    # fractional t: log sigma (= log(s/a)) interpolates linearly between the grid points
    a, s = disc.alpha_sigma(jnp.asarray([500.25], jnp.float32))
    want = 0.75 * np.log(SCHED.sigmas[500]) + 0.25 * np.log(SCHED.sigmas[501])
    np.testing.assert_allclose(np.log(s / a), [want], rtol=1e-5)


@pytest.mark.parametrize("name", list(PROCS))
def test_derivatives_match_finite_differences(name):
    proc = PROCS[name]
    t = interior_times(proc, n=16, seed=5)
    if name == "discrete":  # alpha, sigma have kinks at the integers: stay inside one interval
        t, h = jnp.floor(t) + 0.5, 0.25
    elif name == "edm":
        h = 1e-2 * t
    else:  # VDM's gamma moves 18 per unit time: keep h * gamma' small
        h = 2e-3
    a, s, da, ds = proc.alpha_sigma_derivatives(t)
    a_hi, s_hi = proc.alpha_sigma(t + h)
    a_lo, s_lo = proc.alpha_sigma(t - h)
    fd_a, fd_s = (a_hi - a_lo) / (2 * h), (s_hi - s_lo) / (2 * h)
    # central differences in float32: error ~ h^2 f''' + 1e-7 / h
    np.testing.assert_allclose(da, fd_a, rtol=2e-3, atol=2e-4 * float(jnp.abs(fd_a).max()))
    np.testing.assert_allclose(ds, fd_s, rtol=2e-3, atol=2e-4 * float(jnp.abs(fd_s).max()))
    np.testing.assert_allclose(a, proc.alpha_sigma(t)[0], rtol=1e-6)
    np.testing.assert_allclose(s, proc.alpha_sigma(t)[1], rtol=1e-6)


@pytest.mark.parametrize("name", list(PROCS))
def test_time_at_log_snr_inverts_log_snr(name):
    """Each process's own inverse (closed form for flow and EDM, interpolation for discrete, the
    base class's bisection for VDM), and the bisection default on every process."""
    proc = PROCS[name]
    t = interior_times(proc, seed=6)
    lam = proc.log_snr(t)
    atol = 1e-2 if name == "discrete" else 2e-5 * (proc.t_max - proc.t_min)  # discrete: log SNR of fractional t
    np.testing.assert_allclose(proc.time_at_log_snr(lam), t, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(processes.Process.time_at_log_snr(proc, lam), t, rtol=1e-5, atol=atol)
    jitted = jax.jit(lambda p, l: p.time_at_log_snr(l))
    np.testing.assert_allclose(jitted(proc, lam), t, rtol=1e-5, atol=atol)


def test_processes_cross_jit_and_vdm_parameters_are_traced():
    traces = []

    @jax.jit
    def levels(proc, t):
        traces.append(proc.name)  # runs only while tracing
        return proc.alpha_sigma(t)

    t = jnp.linspace(0.1, 0.9, 5)
    for name, proc in PROCS.items():
        np.testing.assert_allclose(levels(proc, t), proc.alpha_sigma(t), rtol=1e-6, err_msg=name)
    traces.clear()
    other = PROCS["vdm_learned"].bind(jax.tree.map(lambda p: p * 1.5, PROCS["vdm_learned"].params))
    a1, _ = levels(PROCS["vdm_learned"], t)
    a2, _ = levels(other, t)
    assert traces == [], "new VDM parameters retraced"
    assert float(jnp.abs(a1 - a2).max()) > 1e-3  # and they were used
    levels(processes.make_process("flow", shift=2.0), t)  # static settings are part of the program
    assert traces == ["flow"]
    # a process is a pytree: its leaves are exactly VDM's parameters
    assert jax.tree.leaves(PROCS["flow"]) == [] and jax.tree.leaves(PROCS["vdm_fixed"]) == []
    assert len(jax.tree.leaves(PROCS["vdm_learned"])) == len(jax.tree.leaves(PROCS["vdm_learned"].params))


# ---------------------------------------------------------------- VDM's learned gamma


def test_vdm_gamma_starts_at_its_endpoints():
    for gamma_min, gamma_max in ((-13.3, 5.0), (-10.0, 8.0)):
        proc = processes.make_process("vdm", gamma_min=gamma_min, gamma_max=gamma_max)
        proc = proc.bind(proc.init_params(jax.random.PRNGKey(1)))
        np.testing.assert_allclose(proc.gamma(jnp.asarray([0.0, 1.0])), [gamma_min, gamma_max], atol=1e-3)
        fixed = processes.make_process("vdm", gamma_min=gamma_min, gamma_max=gamma_max, learned=False)
        np.testing.assert_allclose(fixed.gamma(jnp.asarray([0.0, 1.0])), [gamma_min, gamma_max], atol=1e-6)
        assert fixed.init_params(jax.random.PRNGKey(1)) == {}
    with pytest.raises(ValueError, match="bind them with proc.bind"):
        processes.make_process("vdm").alpha_sigma(jnp.asarray([0.5]))


def test_vdm_gamma_is_monotone_for_any_parameters_and_after_training():
    """|kernels| make every layer non-decreasing, whatever the signs the parameters take: random
    parameters of either sign, and parameters after gradient steps that push gamma towards a
    decreasing target (they turn kernels negative; gamma stays non-decreasing)."""
    t = jnp.linspace(0.0, 1.0, 2001)
    vdm_gamma = jax.jit(processes.vdm_gamma)
    init = processes.vdm_gamma_init(jax.random.PRNGKey(0))
    for seed in range(5):
        leaves, treedef = jax.tree.flatten(init)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        noisy = [leaf + 3.0 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
        gamma = vdm_gamma(jax.tree.unflatten(treedef, noisy), t)
        assert float(jnp.diff(gamma).min()) >= -1e-5, seed

    def loss(params):  # gamma pulled towards a decreasing curve
        return jnp.mean((vdm_gamma(params, t) - (5.0 - 20.0 * t + 3.0 * jnp.sin(9.0 * t))) ** 2)

    params = init
    grad = jax.grad(loss)
    sgd = jax.jit(lambda params: jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params)))
    for _ in range(20):
        params = sgd(params)
    gamma = vdm_gamma(params, t)
    assert float(jnp.diff(gamma).min()) >= -1e-5
    assert float(params["l1"]["kernel"].min()) < 0 or float(params["l3"]["kernel"].min()) < 0  # the abs mattered
    assert float(loss(params)) < float(loss(init))  # and the steps did train
    # the process built on the trained parameters is a valid VP process
    a, s = _VDM.bind(params).alpha_sigma(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    assert float(jnp.diff(s).min()) >= -1e-6


# ---------------------------------------------------------------- grids


def test_time_grids():
    n = 10
    for name, proc in PROCS.items():
        grid = proc.time_grid(n)
        assert grid.shape == (n + 1,), name
        assert np.all(np.diff(grid.astype(np.float64)) < 0), name
    np.testing.assert_allclose(PROCS["flow"].time_grid(n), np.linspace(1, 0, n + 1), atol=1e-7)
    u = np.linspace(1, 0, n + 1)
    np.testing.assert_allclose(PROCS["flow_shift3"].time_grid(n), 3 * u / (1 + 2 * u), atol=1e-7)
    assert PROCS["flow_shift3"].time_grid(n)[1] > PROCS["flow"].time_grid(n)[1]  # more time at high noise
    edm = PROCS["edm"].time_grid(n)
    assert edm.dtype == np.float32 and edm[-1] == 0.0
    i = np.arange(n) / (n - 1)
    np.testing.assert_allclose(edm[:-1], (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-6)
    np.testing.assert_allclose(edm[[0, -2]], [80.0, 0.002], rtol=1e-6)
    np.testing.assert_allclose(PROCS["vdm_learned"].time_grid(n), np.linspace(1, 0, n + 1), atol=1e-7)
    disc = PROCS["discrete"].time_grid(n)
    assert disc.dtype == np.int32
    np.testing.assert_array_equal(disc, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1])
    for name, proc in PROCS.items():  # the grid's clean end
        a, s = proc.alpha_sigma(jnp.asarray(proc.time_grid(n)[-1:]))
        assert float(a[0]) == pytest.approx(1.0, abs=1e-5) and float(s[0]) < 2e-3, name


# ---------------------------------------------------------------- errors


def test_make_process_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="unknown process 'rectified'; allowed: 'discrete', 'flow', 'edm', 'vdm'"):
        processes.make_process("rectified")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['sigma'\] for process 'edm'; allowed: "
                                         r"\['sigma_min', 'sigma_max', 'sigma_data', 'rho'\]"):
        processes.make_process("edm", sigma=1.0)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['params'\] for process 'vdm'; allowed: "
                                         r"\['gamma_min', 'gamma_max', 'learned'\]"):
        processes.make_process("vdm", params={})
    with pytest.raises(ValueError, match="flow shift must be > 0, got -1.0"):
        processes.make_process("flow", shift=-1.0)
    with pytest.raises(ValueError, match="edm needs 0 < sigma_min < sigma_max, got .*'sigma_min': 90"):
        processes.make_process("edm", sigma_min=90.0)
    with pytest.raises(ValueError, match="edm needs 0 < sigma_min < sigma_max, got .*'sigma_min': 0.0"):
        processes.make_process("edm", sigma_min=0.0)
    with pytest.raises(ValueError, match="vdm needs gamma_min < gamma_max, got .*'gamma_max': -20"):
        processes.make_process("vdm", gamma_max=-20.0)
    with pytest.raises(ValueError, match="process 'discrete' needs schedule=<a NoiseSchedule"):
        processes.make_process("discrete")
    with pytest.raises(ValueError, match="process 'discrete' needs schedule=<a NoiseSchedule"):
        processes.make_process("discrete", schedule="linear")
    with pytest.raises(ValueError, match="flow shift must be a finite number, got '3'"):
        processes.make_process("flow", shift="3")
    with pytest.raises(ValueError, match="edm sigma_max must be a finite number, got inf"):
        processes.make_process("edm", sigma_max=float("inf"))
    with pytest.raises(ValueError, match="edm sigma_data must be > 0, got 0.0"):
        processes.make_process("edm", sigma_data=0.0)
    with pytest.raises(ValueError, match="edm rho must be > 0, got -7"):
        processes.make_process("edm", rho=-7)
    with pytest.raises(ValueError, match="vdm learned must be True or False, got 'yes'"):
        processes.make_process("vdm", learned="yes")
    with pytest.raises(ValueError, match="vdm gamma_min must be a finite number, got True"):
        processes.make_process("vdm", gamma_min=True)
    assert processes.make_process("edm", rho=np.float32(3.0), sigma_max=80).rho == 3.0
    with pytest.raises(TypeError, match="expected a Process or a NoiseSchedule, got str"):
        processes.as_process("flow")
