"""Every supported diffusers scheduler, step for step, on the real SD 1.5 and SD 2.1 configs.

The network is the closed-form optimal denoiser of a Gaussian mixture, evaluated at the exact
inputs each side gives it (after scale_model_input), so the two loops can only agree if every
timestep, input scale and update coefficient agrees. Stochastic schedulers get the same noise
on both sides (diffusers' randn_tensor is replaced by a list of our draws).
"""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import schedules, sd_schedulers
from ldm_jax.diffusion.sd_schedulers import Scheduler
from tests.diffusion.oracles import GaussianMixture

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHED = schedules.make_schedule("scaled_linear", 1000)
MIXTURE = GaussianMixture([0.6, 0.4], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.1, 0.2, 0.3], [0.2, 0.1, 0.1]])

# The scheduler configs of the real folders (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}
BASES = {"sd15": SD15, "sd21": SD21}

# (class, overrides as a user passes them to from_config)
CASES = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                              "algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# The options beyond the SD defaults, on SD 1.5 only.
EXTRA = {
    "ddim_eta": ("DDIMScheduler", {}, 0.7),
    "ddim_trailing_alpha_one": ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 0.0),
    "ddim_linspace": ("DDIMScheduler", {"timestep_spacing": "linspace"}, 0.0),
    "ddim_zero_snr_v": ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                          "prediction_type": "v_prediction"}, 0.0),
    "ddim_clip": ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 0.8}, 0.0),
    "ddim_threshold": ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                         "sample_max_value": 1.5}, 0.0),
    "ddpm_large_threshold": ("DDPMScheduler", {"variance_type": "fixed_large", "thresholding": True,
                                               "sample_max_value": 1.2}, 0.0),
    "pndm_trailing": ("PNDMScheduler", {"timestep_spacing": "trailing"}, 0.0),
    "euler_leading_sigma_min": ("EulerDiscreteScheduler", {"timestep_spacing": "leading",
                                                            "final_sigmas_type": "sigma_min"}, 0.0),
    "euler_karras_range": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.1,
                                                       "sigma_max": 10.0}, 0.0),
    "euler_a_zero_snr_v": ("EulerAncestralDiscreteScheduler", {"rescale_betas_zero_snr": True,
                                                                "timestep_spacing": "trailing",
                                                                "prediction_type": "v_prediction"}, 0.0),
    "pndm_linspace": ("PNDMScheduler", {"timestep_spacing": "linspace"}, 0.0),
    "ddpm_trailing_v": ("DDPMScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 0.0),
    "heun_karras_clip": ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "clip_sample": True,
                                                   "clip_sample_range": 0.9}, 0.0),
    "dpm++_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}, 0.0),
    "dpm++_2m_heun_leading": ("DPMSolverMultistepScheduler", {"solver_type": "heun",
                                                               "timestep_spacing": "leading"}, 0.0),
    "dpm++_3m_sde_sigma_min": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++",
                                                                "final_sigmas_type": "sigma_min"}, 0.0),
    "dpm++_2m_sde_heun_trailing": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                    "solver_type": "heun",
                                                                    "timestep_spacing": "trailing"}, 0.0),
    "dpm++_2m_euler_final_threshold": ("DPMSolverMultistepScheduler", {"euler_at_final": True, "thresholding": True,
                                                                        "sample_max_value": 1.3,
                                                                        "final_sigmas_type": "sigma_min"}, 0.0),
    "unipc_3_trailing": ("UniPCMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}, 0.0),
}
STEPS = 20
BATCH = 6


def _oracle(prediction):
    """The mixture's optimal network on [B, 1, 3] samples (diffusers' thresholding wants a
    channel axis and more)."""
    fn = MIXTURE.model_fn(SCHED, prediction)
    return lambda x, t: fn(x.reshape(x.shape[0], 3), t).reshape(x.shape)


class _NoiseFeed:
    """Stands in for diffusers' randn_tensor: hands out our noise, one array per call."""

    def __init__(self, noise):
        self.noise, self.calls = noise, 0

    def __call__(self, shape, *args, **kwargs):
        z = torch.tensor(np.asarray(self.noise[self.calls]), dtype=torch.float32).reshape(shape)
        self.calls += 1
        return z


def run_diffusers(scheduler, x_T, prediction, *, eta=0.0, noise=None, start_step=0, z0=None, z0_noise=None,
                  monkeypatch=None):
    """StableDiffusionPipeline's loop (img2img's when start_step > 0) with the oracle as the network."""
    oracle = _oracle(prediction)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    if noise is not None:
        module = inspect.getmodule(type(scheduler))
        monkeypatch.setattr(module, "randn_tensor", _NoiseFeed(noise))
    if start_step:
        timesteps = timesteps[start_step * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step * scheduler.order)
        x = scheduler.add_noise(torch.tensor(z0), torch.tensor(z0_noise), timesteps[:1])
    else:
        x = torch.tensor(np.asarray(x_T), dtype=torch.float32) * scheduler.init_noise_sigma
    kwargs = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in timesteps:
        model_in = scheduler.scale_model_input(x, t)
        tt = jnp.full((x.shape[0],), float(t), jnp.float32)
        out = oracle(jnp.asarray(model_in.numpy()), tt)
        x = scheduler.step(torch.tensor(np.asarray(out)), t, x, **kwargs).prev_sample
    return x.numpy()


def run_ours(s: Scheduler, x_T, *, eta=0.0, noise=None, start_step=0, z0=None, z0_noise=None):
    p = sd_schedulers.plan(s, STEPS, start_step)
    if start_step:
        x = sd_schedulers.start_state(p, jnp.asarray(z0_noise), jnp.asarray(z0))
    else:
        x = sd_schedulers.start_state(p, jnp.asarray(x_T))
    out = sd_schedulers.sample(jax.tree_util.Partial(_oracle(s.prediction)), s, x.shape, jax.random.PRNGKey(0),
                               STEPS, eta=eta, x_T=x, start_step=start_step,
                               noise=None if noise is None else jnp.asarray(noise))
    return np.asarray(out)


def _compare(cls, base, overrides, eta, monkeypatch, start_step=0):
    config = {**base, **overrides}
    ref_scheduler = getattr(diffusers, cls).from_config(base, **overrides)
    ours = Scheduler.from_config(config, class_name=cls)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((BATCH, 1, 3)).astype(np.float32)
    z0 = MIXTURE.sample(rng, BATCH)[0].reshape(BATCH, 1, 3)
    z0_noise = rng.standard_normal((BATCH, 1, 3)).astype(np.float32)
    K = len(sd_schedulers.plan(ours, STEPS, start_step)["t"])
    noise = None
    if sd_schedulers.is_stochastic(ours, eta):
        noise = rng.standard_normal((K, BATCH, 1, 3)).astype(np.float32)
    kw = dict(eta=eta, noise=noise, start_step=start_step, z0=z0, z0_noise=z0_noise)
    ref = run_diffusers(ref_scheduler, x_T, ours.prediction, monkeypatch=monkeypatch, **kw)
    got = run_ours(ours, x_T, **kw)
    err = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref)))
    print(f"{cls} {overrides} eta={eta} start={start_step}: max |ours - diffusers| = {err:.2e} (scale {scale:.2f})")
    return err, scale


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_on_real_sd_configs(case, base, monkeypatch):
    cls, overrides = CASES[case]
    err, scale = _compare(cls, BASES[base], overrides, 0.0, monkeypatch)
    assert err <= 5e-5 * max(scale, 1.0)


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_matches_diffusers_with_options(case, monkeypatch):
    cls, overrides, eta = EXTRA[case]
    err, scale = _compare(cls, SD15, overrides, eta, monkeypatch)
    assert err <= 5e-5 * max(scale, 1.0)


@pytest.mark.parametrize("case", ["pndm", "ddim", "euler_a", "heun", "lms", "dpm++_2m_karras", "dpm++_2m_sde_karras",
                                  "unipc"])
def test_img2img_start_matches_diffusers(case, monkeypatch):
    cls, overrides = CASES[case]
    err, scale = _compare(cls, SD15, overrides, 0.0, monkeypatch, start_step=7)
    assert err <= 5e-5 * max(scale, 1.0)


def test_class_key_table_is_diffusers_signature():
    """Every __init__ argument of every supported class is either implemented or refused when it
    differs from its default: our table must list exactly diffusers' arguments and defaults."""
    for cls, keys in sd_schedulers.CLASS_KEYS.items():
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        theirs = {k: v.default for k, v in params.items() if k != "self"}
        assert set(theirs) == set(keys), cls
        for k, v in theirs.items():
            same = v == keys[k] or (isinstance(v, float) and math.isinf(v) and v == keys[k])
            assert same, (cls, k, v, keys[k])


@pytest.mark.parametrize("cls, key, value", [
    ("DDIMScheduler", "timestep_spacing", "cosine"),
    ("DPMSolverMultistepScheduler", "use_lu_lambdas", True),
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
    ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
    ("EulerDiscreteScheduler", "timestep_type", "continuous"),
    ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
    ("EulerDiscreteScheduler", "use_exponential_sigmas", True),
    ("PNDMScheduler", "skip_prk_steps", False),
    ("UniPCMultistepScheduler", "use_karras_sigmas", True),
    ("UniPCMultistepScheduler", "solver_type", "bh1"),
    ("DDPMScheduler", "variance_type", "learned_range"),
])
def test_unsupported_values_are_refused_by_name(cls, key, value):
    with pytest.raises(ValueError, match=key):
        Scheduler.from_config({**SD15, key: value}, class_name=cls)


def test_unknown_class_names_the_supported_ones():
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler.*supported: DDIMScheduler"):
        Scheduler.from_config({**SD15, "_class_name": "KDPM2DiscreteScheduler"})


def test_keys_of_other_classes_are_ignored_as_diffusers_ignores_them():
    s = Scheduler.from_config(SD21)  # a DDIM config that carries PNDM's skip_prk_steps
    assert s.ignored == ("skip_prk_steps",)
    assert s.prediction == "v" and s["set_alpha_to_one"] is False
