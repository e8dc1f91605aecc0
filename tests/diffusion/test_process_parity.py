"""Step-for-step parity of `solvers` on the flow and EDM processes with diffusers' schedulers for
them, both driven by the same closed-form optimal predictor (`oracles.process_model_fn`).

Conventions, matched through arguments (the solvers are not bent to them):
- Flow (`FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler`): diffusers' sigma is
  our flow time t, and the model sees timestep = 1000 sigma; its grid is shift(linspace(1,
  shift(1/1000), N)) then 0, not our `time_grid` (shift(linspace(1, 0, N + 1))), so ours runs on
  `times=scheduler.sigmas`. The model predicts the velocity eps - x0 (SD3's target).
- EDM (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`): the diffusers loop feeds the network
  c_in x and c_noise = ln(sigma)/4 (its `timesteps`), and its `prediction_type="epsilon"` means
  EDM's F-network: denoised = c_skip x + c_out F (Karras et al. 2022, Table 1). So the network
  given to diffusers recovers sigma = exp(4 c_noise) and x = (c_in x)/c_in, and returns
  F = (x0_hat - c_skip x)/c_out; ours is the x0 oracle itself (prediction="x0") on
  `times=scheduler.sigmas`. Both start from x_T = sqrt(sigma_max^2 + 1) z (diffusers'
  `init_noise_sigma`, our `prior_std`). Its Karras grid is our `time_grid`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import processes, samplers
from tests.diffusion.oracles import process_model_fn
from tests.diffusion.test_sampler_parity import MIXTURE

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 20
X_T = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
EDM = processes.make_process("edm")


def _tensor(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def run_diffusers(scheduler, network, x_T):
    """diffusers' sampling loop; network(model input, timestep) -> model output (numpy). (The flow
    schedulers have no init_noise_sigma, 1 for them, and no scale_model_input.)"""
    scheduler.set_timesteps(STEPS)
    x = _tensor(x_T) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        out = network(scale(x, t).numpy(), float(t))
        x = scheduler.step(_tensor(out), t, x).prev_sample
    return x.numpy()


def check(name, ours, ref):
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name}: max |ours - diffusers| = {err:.2e} (scale {np.abs(ref).max():.2f})")
    assert err < 1e-4 * max(1.0, np.abs(ref).max())


# ---------------------------------------------------------------- flow


@pytest.mark.parametrize("sampler,shift", [("euler", 1.0), ("euler", 3.0), ("heun", 1.0), ("heun", 3.0)])
def test_flow_matches_diffusers_flow_match_schedulers(sampler, shift):
    proc = processes.make_process("flow", shift=shift)
    model = jax.jit(process_model_fn(MIXTURE, proc, "velocity"))
    make = {"euler": diffusers.FlowMatchEulerDiscreteScheduler, "heun": diffusers.FlowMatchHeunDiscreteScheduler}
    scheduler = make[sampler](num_train_timesteps=1000, shift=shift)
    ref = run_diffusers(scheduler, lambda x, timestep: model(jnp.asarray(x), jnp.full((x.shape[0],), timestep / 1000)),
                        X_T)
    times = scheduler.sigmas.numpy()
    if sampler == "heun":  # its sigmas repeat every inner time (a first- and a second-order stage)
        times = np.append(times[::2], 0.0)
    assert len(times) == STEPS + 1 and times[0] == 1.0 and times[-1] == 0.0
    ours = samplers.sample(model, proc, X_T.shape, jax.random.PRNGKey(1), sampler=sampler, num_steps=STEPS,
                           prediction="velocity", times=times, x_T=X_T)
    check(f"flow shift {shift} {sampler}", ours, ref)


# ---------------------------------------------------------------- EDM


def edm_f_network(x0_model, sigma_data=0.5):
    """EDM's F(c_in x; c_noise) whose preconditioned output c_skip x + c_out F is the oracle's x0."""
    def network(x_in, c_noise):
        sigma = np.exp(4.0 * np.float64(c_noise))
        x = x_in / (1.0 / np.sqrt(sigma**2 + sigma_data**2))
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
        x0 = np.asarray(x0_model(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), sigma, jnp.float32)), np.float64)
        return (x0 - c_skip * x) / c_out

    return network


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_edm_matches_diffusers_edm_euler(schedule):
    model = jax.jit(process_model_fn(MIXTURE, EDM, "x0"))
    scheduler = diffusers.EDMEulerScheduler(sigma_schedule=schedule)
    ref = run_diffusers(scheduler, edm_f_network(model), X_T)
    times = scheduler.sigmas.numpy()
    if schedule == "karras":
        np.testing.assert_allclose(times, EDM.time_grid(STEPS), rtol=1e-6)
    ours = samplers.sample(model, EDM, X_T.shape, jax.random.PRNGKey(1), sampler="euler", num_steps=STEPS,
                           prediction="x0", times=times, x_T=X_T * scheduler.init_noise_sigma)
    np.testing.assert_allclose(scheduler.init_noise_sigma, EDM.prior_std, rtol=1e-6)
    check(f"edm euler ({schedule} sigmas)", ours, ref)


@pytest.mark.parametrize("order", [2, 3])
def test_edm_matches_diffusers_edm_dpm_solver(order):
    model = jax.jit(process_model_fn(MIXTURE, EDM, "x0"))
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(solver_order=order)
    ref = run_diffusers(scheduler, edm_f_network(model), X_T)
    ours = samplers.sample(model, EDM, X_T.shape, jax.random.PRNGKey(1), sampler="dpm_solver++", order=order,
                           num_steps=STEPS, prediction="x0", times=scheduler.sigmas.numpy(),
                           x_T=X_T * scheduler.init_noise_sigma)
    check(f"edm dpm_solver++ {order}M", ours, ref)
