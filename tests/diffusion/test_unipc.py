"""UniPC (Zhao et al. 2023) in `solvers`: step-for-step parity with diffusers' UniPCMultistepScheduler
on a closed-form Gaussian-mixture model, its convergence order on Gaussian data, the step from
alpha = 0, and the 2-D mixture reproduced under every process."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import processes, samplers, schedules, solvers
from tests.diffusion.oracles import GaussianMixture, process_model_fn
from tests.diffusion.test_samplers import MIXTURE as MIXTURE_2D
from tests.diffusion.test_samplers import NUM_SAMPLES, TOL_MEAN, TOL_VAR_REL, TOL_WEIGHT, mixture_stats

SCHED = schedules.make_schedule("scaled_linear", 1000)
DISCRETE = processes.make_process("discrete", schedule=SCHED)
FLOW = processes.make_process("flow")
MIXTURE = GaussianMixture([0.6, 0.4], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.1, 0.2, 0.3], [0.2, 0.1, 0.1]])
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FLOW_SHIFT = 3.0

# ---------------------------------------------------------------- parity with diffusers

# name: (diffusers' settings, our process, our prediction); diffusers' defaults otherwise
# (predict_x0, bh2, lower_order_final, the corrector at every step, final sigma 0).
CONFIGS = {
    "sd15_linspace": (dict(SD_BETAS, timestep_spacing="linspace"), DISCRETE, "eps"),
    "sd15_trailing": (dict(SD_BETAS, timestep_spacing="trailing"), DISCRETE, "eps"),
    "sd21_v": (dict(SD_BETAS, timestep_spacing="trailing", prediction_type="v_prediction"), DISCRETE, "v"),
    "flow": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=FLOW_SHIFT), FLOW, "velocity"),
}
CASES = [("sd15_linspace", 2, 10), ("sd15_linspace", 2, 25), ("sd15_linspace", 3, 10), ("sd15_linspace", 3, 25),
         ("sd15_trailing", 1, 10), ("sd15_trailing", 3, 25), ("sd21_v", 2, 10), ("sd21_v", 3, 25), ("flow", 2, 10),
         ("flow", 3, 25)]


def run_diffusers(scheduler, model, x_T, steps, flow):
    """diffusers' sampling loop with our oracle, called through numpy. A flow model sees the
    scheduler's sigma (our flow time); its integer `timesteps` are 1000 sigma rounded down."""
    torch = pytest.importorskip("torch")
    scheduler.set_timesteps(steps)
    x = torch.tensor(np.asarray(x_T)) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        t_model = jnp.full((x.shape[0],), float(scheduler.sigmas[i])) if flow else jnp.full((x.shape[0],), int(t))
        out = model(jnp.asarray(scheduler.scale_model_input(x, t).numpy()), t_model)
        x = scheduler.step(torch.tensor(np.asarray(out)), t, x).prev_sample
    return x.numpy(), scheduler


@pytest.mark.parametrize("name,order,steps", CASES, ids=[f"{n}-order{o}-{s}" for n, o, s in CASES])
def test_matches_diffusers_unipc(name, order, steps):
    diffusers = pytest.importorskip("diffusers")
    settings, proc, prediction = CONFIGS[name]
    model = process_model_fn(MIXTURE, proc, prediction)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    ref, scheduler = run_diffusers(diffusers.UniPCMultistepScheduler(**settings, solver_order=order), jax.jit(model),
                                   x_T, steps, flow=proc is FLOW)
    kw = dict(num_steps=steps, prediction=prediction, order=order, x_T=x_T)
    if proc is FLOW:  # our flow time is diffusers' sigma (whose first is 1 - 1e-6, so alpha > 0 there)
        ours = solvers.sample(model, FLOW, x_T.shape, jax.random.PRNGKey(1), "unipc",
                              times=scheduler.sigmas.numpy(), **kw)
    elif settings["timestep_spacing"] == "trailing":  # the same timesteps as ours: through samplers.sample
        np.testing.assert_array_equal(scheduler.timesteps.numpy(), samplers.timesteps(1000, steps, "trailing"))
        ours = samplers.sample(model, SCHED, x_T.shape, jax.random.PRNGKey(1), sampler="unipc", spacing="trailing",
                               **kw)
    else:
        # diffusers' UniPC "linspace" is round(linspace(0, T - 1, N + 1))[::-1][:-1] (it drops 0), not
        # our `samplers.timesteps` (round(linspace(0, T - 1, N)), ending at 0): its grid goes in directly.
        assert not np.array_equal(scheduler.timesteps.numpy(), samplers.timesteps(1000, steps, "linspace"))
        ours = solvers.sample(model, DISCRETE, x_T.shape, jax.random.PRNGKey(1), "unipc",
                              times=np.append(scheduler.timesteps.numpy(), -1), **kw)
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name} order {order} {steps} steps: max |ours - diffusers| = {err:.2e}")
    assert err < 1e-4 * max(1.0, np.abs(ref).max())


# ---------------------------------------------------------------- convergence on Gaussian data

MU, LAM = 0.5, 0.3
GAUSSIAN = GaussianMixture([1.0], [[MU] * 4], [[LAM] * 4])


def exact_ode(x_T, proc, t_start, t_end):
    """The probability-flow ODE of x0 ~ N(MU, LAM) from x_T at t_start to t_end: the standardised
    coordinate (x_t - alpha mu) / sqrt(alpha^2 lam + sigma^2) is constant along it."""
    (a0, s0), (a1, s1) = ((float(v) for v in proc.alpha_sigma(jnp.asarray(t))) for t in (t_start, t_end))
    z = (np.asarray(x_T) - a0 * MU) / np.sqrt(a0**2 * LAM + s0**2)
    return a1 * MU + np.sqrt(a1**2 * LAM + s1**2) * z


@pytest.fixture(scope="module")
def x_T_gaussian():
    return jax.random.normal(jax.random.PRNGKey(1), (64, 4))


def rms(x, exact):
    return float(np.sqrt(np.mean((np.asarray(x) - exact) ** 2)))


def log_snr_uniform_grid(num_steps):
    """Fractional discrete times from T - 1 to 0, evenly spaced in lambda."""
    ends = DISCRETE.log_snr(jnp.asarray([DISCRETE.t_max, 0.0]))
    return np.asarray(DISCRETE.time_at_log_snr(jnp.linspace(ends[0], ends[1], num_steps + 1)))


# (steps, bound on the fitted slope). UniPC-2 (UniP-2 then UniC) is third order (UniP-2 alone
# measures -1.77 on the discrete grid):
# - flow, the default grid from t = 1 (alpha = 0, lambda = -inf) to the data: the last step,
#   first order to sigma = 0, leaves the posterior mean's O(sigma^2) = O(N^-2) bias, so second
#   order; measured -2.04. N = 10 is not yet asymptotic there (DPM-Solver++ too): -1.50 over 10-80.
# - discrete scaled_linear, steps even in lambda from t = 999 to t = 0 (no last step to the data):
#   measured -2.98. On the integer "linspace" grid the last step, t = 1000/N -> 0, spans
#   h ~ log(1000/N)/2 in lambda, which hardly falls with N: over 10-80 steps UniPC-2 measures -1.28
#   to the data and -1.29 to t = 0, DPM-Solver++(2M) -1.20, whatever their order.
CONVERGENCE = {"flow": ([20, 40, 80, 160], -1.8), "discrete": ([10, 20, 40, 80], -2.5)}


@pytest.mark.parametrize("process", list(CONVERGENCE))
def test_unipc_order_2_converges_at_its_order(x_T_gaussian, process):
    (steps, bound), x_T, errors = CONVERGENCE[process], x_T_gaussian, []
    for n in steps:
        if process == "flow":
            x = samplers.sample(process_model_fn(GAUSSIAN, FLOW, "velocity"), FLOW, x_T.shape, jax.random.PRNGKey(0),
                                sampler="unipc", num_steps=n, prediction="velocity", x_T=x_T)
            exact = exact_ode(x_T, FLOW, 1.0, 0.0)
        else:
            times = log_snr_uniform_grid(n)
            x = solvers.sample(process_model_fn(GAUSSIAN, DISCRETE, "eps"), DISCRETE, x_T.shape, jax.random.PRNGKey(0),
                               "unipc", n, "eps", times=times, x_T=x_T)
            exact = exact_ode(x_T, DISCRETE, times[0], times[-1])
        errors.append(rms(x, exact))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    print(f"unipc order 2 on {process}: " + "  ".join(f"N={n}: {e:.2e}" for n, e in zip(steps, errors))
          + f"  slope {slope:.2f}")
    assert slope <= bound


def test_step_from_alpha_zero_is_the_limit_of_steps_from_alpha_to_zero(x_T_gaussian):
    """Order 3 on a flow grid from t_0 = 1 (alpha = 0, where the oldest history point's r = -inf
    drops out of UniPC's systems) against grids from t_0 = 1 - delta: finite, and the runs from
    1 - delta approach it as delta -> 0 (slowly: lambda_0 = log delta)."""
    model, x_T = process_model_fn(GAUSSIAN, FLOW, "velocity"), x_T_gaussian
    grid = FLOW.time_grid(20)

    def run(t0):
        return np.asarray(solvers.sample(model, FLOW, x_T.shape, jax.random.PRNGKey(0), "unipc", 20, "velocity",
                                         times=np.concatenate([[t0], grid[1:]]), order=3, x_T=x_T))

    at_zero = run(1.0)
    assert np.all(np.isfinite(at_zero))
    gaps = [float(np.abs(run(1.0 - delta) - at_zero).max()) for delta in (1e-2, 1e-4, 1e-6)]
    error = rms(at_zero, exact_ode(x_T, FLOW, 1.0, 0.0))
    print(f"max |x(t_0 = 1 - delta) - x(t_0 = 1)|, delta = 1e-2, 1e-4, 1e-6: {gaps}; error at t_0 = 1: {error:.1e}")
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4


# ---------------------------------------------------------------- the 2-D mixture under every process

# (process, prediction, steps): the step counts at which UniPC-2 reproduces the mixture within
# tolerance (variances at 25 steps: flow 0.044, edm 0.121, vdm 0.067, discrete 0.165; DPM-Solver++
# 0.046, 0.143, 0.103, 0.170).
MIXTURE_CASES = [("flow", "velocity", 20), ("edm", "eps", 35), ("vdm", "v", 25), ("discrete", "eps", 50)]


@pytest.mark.parametrize("process,prediction,steps", MIXTURE_CASES, ids=[c[0] for c in MIXTURE_CASES])
def test_unipc_reproduces_the_mixture(process, prediction, steps):
    proc = {"flow": FLOW, "edm": processes.make_process("edm"), "vdm": processes.make_process("vdm", learned=False),
            "discrete": processes.make_process("discrete", schedule=schedules.make_schedule("linear", 1000))}[process]
    kw = dict(spacing="trailing") if process == "discrete" else {}
    x = samplers.sample(process_model_fn(MIXTURE_2D, proc, prediction), proc, (NUM_SAMPLES, 2), jax.random.PRNGKey(0),
                        sampler="unipc", num_steps=steps, prediction=prediction, **kw)
    err_w, err_m, err_v = mixture_stats(np.asarray(x))
    print(f"unipc {process} {steps}: weights {err_w:.3f} means {err_m:.3f} variances {err_v:.3f}")
    assert err_w < TOL_WEIGHT and err_m < TOL_MEAN and err_v < TOL_VAR_REL


def test_unipc_order_is_checked():
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        samplers.sample(lambda x, t: x, SCHED, (1, 3), jax.random.PRNGKey(0), sampler="unipc", order=4)
