"""`solvers` on every continuous process, driven by the closed-form optimal predictor of a Gaussian
mixture (`oracles.process_model_fn`): every sampler reproduces the mixture on every process; a
discrete process runs the old path bit for bit; EDM's stochastic sampler without churn is Heun.
(The convergence orders on the linear-Gaussian case are in test_process_convergence.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from ldm_jax.diffusion import processes, samplers, schedules, solvers
from tests.diffusion.oracles import process_model_fn
from tests.diffusion.test_samplers import MIXTURE, NUM_SAMPLES, TOL_MEAN, TOL_VAR_REL, TOL_WEIGHT, mixture_stats

SCHED = schedules.make_schedule("linear", 1000)
_VDM = processes.make_process("vdm")
# (process, prediction): each process with a prediction defined at its t_max (flow starts at
# alpha = 0, where eps carries no information about x0: velocity or x0 there).
PROCESS_CASES = {
    "flow": (processes.make_process("flow"), "velocity"),
    "flow_shift3": (processes.make_process("flow", shift=3.0), "x0"),
    "edm": (processes.make_process("edm"), "eps"),
    "vdm_fixed": (processes.make_process("vdm", learned=False), "eps"),
    "vdm_learned": (_VDM.bind(_VDM.init_params(jax.random.PRNGKey(0))), "v"),
}
# EDM's stochastic sampler with Karras et al.'s ImageNet churn, but S_noise = 1: the oracle is the
# exact denoiser, so any extra noise would only inflate the variances.
CHURN = solvers.Churn(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)
# (label, sampler, steps, kwargs). The steps: the worst error over the five processes (measured
# with this seed) at about 2/3 of the tolerance or less. SD3's shift 3 is the hardest process for
# every sampler (it spends its steps at high noise); the stochastic samplers need ~5x the steps of
# the deterministic first-order ones, and their variance error has a floor of ~0.05 from the 8000
# samples alone. VDM's deterministic samplers sit at ~0.03 on the means whatever the steps: its
# prior N(0, I) is not quite the marginal at t = 1 (alpha(1) = 0.08 with gamma_max = 5).
# ddim with eta = 1 is ddpm (test_ddpm_is_ddim_with_eta_one).
SAMPLER_CASES = [
    ("euler", "euler", 200, {}),
    ("heun", "heun", 50, {}),
    ("ddim", "ddim", 200, {}),
    ("ddpm", "ddpm", 1000, {}),
    ("dpm_solver++ 2M", "dpm_solver++", 80, dict(order=2)),
    ("dpm_solver++ 3M", "dpm_solver++", 50, dict(order=3)),
    ("edm (churn)", "edm", 100, dict(churn=CHURN)),
]


@pytest.mark.parametrize("name", list(PROCESS_CASES))
def test_every_sampler_reproduces_the_mixture_on_every_process(name):
    proc, prediction = PROCESS_CASES[name]
    model = process_model_fn(MIXTURE, proc, prediction)
    failures = []
    for label, sampler, steps, kw in SAMPLER_CASES:
        x = samplers.sample(model, proc, (NUM_SAMPLES, 2), jax.random.PRNGKey(0), sampler=sampler, num_steps=steps,
                            prediction=prediction, **kw)
        err_w, err_m, err_v = mixture_stats(np.asarray(x))
        print(f"{name:12s} {label:16s} {steps:5d}  weights {err_w:.3f}  means {err_m:.3f}  variances {err_v:.3f}")
        if not (err_w < TOL_WEIGHT and err_m < TOL_MEAN and err_v < TOL_VAR_REL):
            failures.append((label, steps, round(err_w, 3), round(err_m, 3), round(err_v, 3)))
    assert not failures, failures


def test_eps_prediction_cannot_start_where_alpha_is_zero():
    """At flow's t = 1, x_t is pure noise: x0 = (x_t - sigma eps)/alpha is undefined."""
    proc = processes.make_process("flow")
    with pytest.raises(ValueError, match="prediction 'eps' cannot start at t=1.0, where alpha = 0"):
        samplers.sample(process_model_fn(MIXTURE, proc, "eps"), proc, (4, 2), jax.random.PRNGKey(0), sampler="euler",
                        num_steps=10, prediction="eps")
    # below t = 1 it is defined
    times = np.linspace(0.99, 0.0, 11)
    x = samplers.sample(process_model_fn(MIXTURE, proc, "eps"), proc, (4, 2), jax.random.PRNGKey(0), sampler="euler",
                        num_steps=10, prediction="eps", times=times)
    assert np.all(np.isfinite(np.asarray(x)))


def test_ddpm_is_ddim_with_eta_one():
    proc, prediction = PROCESS_CASES["vdm_learned"]
    args = dict(num_steps=10, prediction=prediction)
    model = process_model_fn(MIXTURE, proc, prediction)
    ddpm = samplers.sample(model, proc, (64, 2), jax.random.PRNGKey(0), sampler="ddpm", **args)
    ddim = samplers.sample(model, proc, (64, 2), jax.random.PRNGKey(0), sampler="ddim", eta=1.0, **args)
    np.testing.assert_array_equal(ddpm, ddim)


# ---------------------------------------------------------------- the discrete path


@pytest.fixture(scope="module")
def discrete_model():
    return MIXTURE.model_fn(SCHED, "eps")


@pytest.mark.parametrize("sampler,kw", [
    ("ddpm", {}), ("ddim", dict(eta=0.5)), ("plms", {}), ("dpm_solver++", {}), ("dpm_solver++", dict(order=3)),
    ("euler", {}), ("euler", dict(karras_sigmas=True)), ("heun", {}), ("edm", dict(churn=CHURN)),
], ids=["ddpm", "ddim", "plms", "dpm2", "dpm3", "euler", "euler-karras", "heun", "edm"])
def test_a_discrete_process_runs_the_schedule_bit_for_bit(discrete_model, sampler, kw):
    args = dict(sampler=sampler, num_steps=10, spacing="trailing", **kw)
    old = samplers.sample(discrete_model, SCHED, (64, 2), jax.random.PRNGKey(0), **args)
    new = samplers.sample(discrete_model, processes.make_process("discrete", schedule=SCHED), (64, 2),
                          jax.random.PRNGKey(0), **args)
    np.testing.assert_array_equal(new, old)


def test_edm_sampler_on_a_schedule_is_heun_without_churn_and_still_right_with_it(discrete_model):
    shape, rng, args = (NUM_SAMPLES, 2), jax.random.PRNGKey(0), dict(num_steps=100, spacing="trailing")
    heun = samplers.sample(discrete_model, SCHED, shape, rng, sampler="heun", **args)
    edm = samplers.sample(discrete_model, SCHED, shape, rng, sampler="edm", **args)
    # The same steps; the only difference is x * sqrt(1 + sigma^2) / sqrt(1 + sigma^2) per step,
    # rounding errors that the ODE amplifies only for the few samples on the boundary between two
    # modes. (Before the noise's std was written as sigma sqrt(gamma (2 + gamma)),
    # sqrt(sigma_hat^2 - sigma^2) added noise of std ~1e-3 at gamma = 0: a median difference of 3e-4.)
    diff = np.abs(np.asarray(edm) - np.asarray(heun))
    print(f"edm (no churn) vs heun: median {np.median(diff):.1e}, 99.9% {np.quantile(diff, 0.999):.1e}, "
          f"max {diff.max():.1e}")
    assert np.median(diff) < 1e-6 and np.quantile(diff, 0.999) < 1e-4 and diff.max() < 2e-3
    churned = samplers.sample(discrete_model, SCHED, shape, rng, sampler="edm", churn=CHURN, **args)  # same program
    assert float(np.abs(np.asarray(churned) - np.asarray(heun)).mean()) > 0.05
    err_w, err_m, err_v = mixture_stats(np.asarray(churned))
    print(f"discrete edm (churn) 100: weights {err_w:.3f}  means {err_m:.3f}  variances {err_v:.3f}")
    assert err_w < TOL_WEIGHT and err_m < TOL_MEAN and err_v < TOL_VAR_REL


def test_edm_sampler_on_a_process_is_heun_without_churn():
    proc, prediction = PROCESS_CASES["flow"]
    model = process_model_fn(MIXTURE, proc, prediction)
    args = dict(num_steps=20, prediction=prediction, return_trajectory=1)
    heun = samplers.sample(model, proc, (256, 2), jax.random.PRNGKey(0), sampler="heun", **args)
    edm = samplers.sample(model, proc, (256, 2), jax.random.PRNGKey(0), sampler="edm", **args)
    np.testing.assert_allclose(edm[1]["x_t"], heun[1]["x_t"], atol=1e-6)
    np.testing.assert_allclose(edm[0], heun[0], atol=1e-6)


@pytest.mark.parametrize("name", ["flow", "edm", "discrete"])
def test_after_step_gets_each_step_and_the_next_times_alpha_bar(name):
    """The hook (x_next, i, abar_next) runs after every step with abar_next = alpha^2 / (alpha^2 +
    sigma^2) at the next grid time (1 at the clean end): a hook that writes abar_next into the
    state shows it in the trajectory, which records the state before each step."""
    proc = {"flow": processes.make_process("flow"), "edm": processes.make_process("edm"),
            "discrete": processes.make_process("discrete", schedule=schedules.make_schedule("linear", 1000))}[name]
    steps = 4
    hook = Partial(lambda x, i, abar: jnp.full_like(x, abar + 10.0 * i))
    zero = Partial(lambda x, t: jnp.zeros_like(x))
    sampler = "euler" if name != "discrete" else "unipc"  # the discrete path through the solvers
    x, traj = samplers.sample(zero, proc, (2, 3), jax.random.PRNGKey(0), sampler=sampler, num_steps=steps,
                              prediction="x0", after_step=hook, return_trajectory=1)
    grid = proc.time_grid(steps) if name != "discrete" else np.append(samplers.timesteps(1000, steps, "leading"), -1)
    a, s = (np.asarray(v, np.float64) for v in proc.alpha_sigma(jax.numpy.asarray(grid)))
    abar = a**2 / (a**2 + s**2)
    want = abar[1:] + 10.0 * np.arange(steps)
    np.testing.assert_allclose(np.asarray(traj["x_t"])[1:, 0, 0], want[:-1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(x), np.full((2, 3), want[-1]), rtol=1e-5)
    assert abar[-1] == 1.0
