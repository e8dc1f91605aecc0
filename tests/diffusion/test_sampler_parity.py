"""Step-for-step parity with diffusers' PyTorch schedulers, driven by the same closed-form model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers, schedules
from tests.diffusion.oracles import GaussianMixture

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHED = schedules.make_schedule("scaled_linear", 1000)
MIXTURE = GaussianMixture([0.6, 0.4], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.1, 0.2, 0.3], [0.2, 0.1, 0.1]])
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def run_diffusers(scheduler, x_T, steps, prediction="eps", variance_preserving_input=True):
    """The diffusers sampling loop; the model is our oracle, called through numpy."""
    oracle = MIXTURE.model_fn(SCHED, prediction)
    scheduler.set_timesteps(steps)
    x = torch.tensor(np.asarray(x_T), dtype=torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = oracle(jnp.asarray(model_in.numpy()), jnp.full((x.shape[0],), float(t) if t.is_floating_point() else int(t)))
        x = scheduler.step(torch.tensor(np.asarray(out)), t, x).prev_sample
    return x.numpy()


CASES = {
    "ddim": (lambda: diffusers.DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, steps_offset=1, clip_sample=False),
             dict(sampler="ddim", spacing="leading", steps_offset=1)),
    "ddim_v": (lambda: diffusers.DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, timestep_spacing="trailing",
                                               clip_sample=False, prediction_type="v_prediction"),
               dict(sampler="ddim", spacing="trailing", prediction="v")),
    "dpm_solver++": (lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                                    timestep_spacing="trailing", final_sigmas_type="zero"),
                     dict(sampler="dpm_solver++", spacing="trailing")),
    "euler": (lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
              dict(sampler="euler", spacing="leading", steps_offset=1)),
    "heun": (lambda: diffusers.HeunDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
             dict(sampler="heun", spacing="leading", steps_offset=1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_scheduler(name):
    make_scheduler, kw = CASES[name]
    x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    prediction = kw.get("prediction", "eps")
    ours = samplers.sample(MIXTURE.model_fn(SCHED, prediction), SCHED, x_T.shape, jax.random.PRNGKey(1),
                           num_steps=20, x_T=x_T, **kw)
    ref = run_diffusers(make_scheduler(), x_T, 20, prediction)
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name}: max |ours - diffusers| = {err:.2e}")
    assert err < 1e-4 * max(1.0, np.abs(ref).max())
