"""The model object runs every process: its loss, its sampler, the network's time input, EDM's
preconditioning and VDM's learned schedule (parameters in the trainable tree)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.diffusion import processes
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.training import ldm_stage
from tests.training.tiny import TINY_UNET, tiny_config

PROCESSES = {
    "flow": dict(process="flow", prediction="velocity", weighting="none", timestep_sampler="logit_normal"),
    "edm": dict(process="edm", process_kwargs={"sigma_data": 1.0}, prediction="x0", weighting="edm",
                preconditioning="edm", timestep_sampler="lognormal"),
    "vdm": dict(process="vdm", objective="vlb", weighting="none", prediction="eps"),
}


def config_for(name):
    c = tiny_config("/nonexistent")
    c.unet = dict(TINY_UNET)
    for k, v in PROCESSES[name].items():
        c.diffusion[k] = v
    c.sampler.name = "heun"
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module", params=list(PROCESSES))
def built(request):
    c = config_for(request.param)
    model = LatentDiffusion.from_config(c)
    params = {**model.init_params(jax.random.PRNGKey(0)), "autoencoder": None, "scale": 1.0}
    cond = model.conditioning.conditions(["a red circle on the left", "a blue square at the top"])[0]
    return request.param, c, model, params, cond


def test_loss_trains_every_part_and_samples_are_finite(built):
    name, c, model, params, cond = built
    h, w, ch = model.latent_shape
    z0 = jax.random.normal(jax.random.PRNGKey(2), (2, h, w, ch))
    t, _ = ldm_stage.make_timestep_sampler(c).sample({}, jax.random.PRNGKey(1), 2)
    assert t.dtype == jnp.float32 and model.continuous
    noise = jax.random.normal(jax.random.PRNGKey(3), z0.shape)
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.loss_terms(p, z0, cond, t, noise).loss))(params)
    assert np.isfinite(float(loss))
    for part in ("unet", "text_encoder") + (("process",) if name == "vdm" else ()):
        norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads[part]))
        assert np.isfinite(norm) and norm > 0, part
    z = model.sample(params, cond, model.conditioning.null(cond), jax.random.PRNGKey(0), sampler="heun",
                     num_steps=2, guidance=2.0, spacing="trailing")
    assert z.shape == (2, h, w, ch) and bool(jnp.all(jnp.isfinite(z)))


def test_the_network_sees_the_process_time_and_edm_preconditioning(built):
    """flow: the UNet's timestep is 1000 t (SD3); EDM: c_noise = ln(sigma)/4 on c_in x, and the model's
    output is D = c_skip x + c_out F (Karras et al. 2022, eq. 7); VDM: 1000 t."""
    name, c, model, params, cond = built
    h, w, ch = model.latent_shape
    x = jax.random.normal(jax.random.PRNGKey(4), (2, h, w, ch))
    t = jnp.array([0.3, 0.7]) if name != "edm" else jnp.array([0.5, 3.0])
    context = model.context(params, cond)
    out = model.model_fn(params, context)(x, t)
    proc = model.process_of(params)
    unet = lambda xin, tn: model.unet.apply({"params": params["unet"]}, xin, tn, context)  # noqa: E731
    if name == "edm":
        sd = proc.sigma_data
        c_skip, c_out, c_in = (sd**2 / (t**2 + sd**2), t * sd / jnp.sqrt(t**2 + sd**2), 1 / jnp.sqrt(t**2 + sd**2))
        b = lambda a: a[:, None, None, None]  # noqa: E731
        expected = b(c_skip) * x + b(c_out) * unet(b(c_in) * x, 0.25 * jnp.log(t))
    else:
        expected = unet(x, 1000.0 * t)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_vdm_gamma_lives_in_the_trainable_parameters():
    model = LatentDiffusion.from_config(config_for("vdm"))
    params = model.init_params(jax.random.PRNGKey(0))
    proc = model.process_of(params)
    assert isinstance(proc, processes.VDMProcess)
    np.testing.assert_allclose(proc.gamma(jnp.array([0.0, 1.0])), [-13.3, 5.0], atol=0.05)
    # The discrete model's parameters are what they always were: no "process" entry.
    base = LatentDiffusion.from_config(tiny_config("/nonexistent"))
    assert "process" not in jax.eval_shape(base.init_params, jax.random.PRNGKey(0))


def test_impossible_process_settings_are_refused_with_the_key():
    cases = [
        (dict(process="flow", objective="vlb"), "diffusion.objective='vlb' with diffusion.process='flow'"),
        (dict(process="flow", prediction="eps", weighting="none", process_kwargs={"shift": -1.0}), "shift must be > 0"),
        (dict(process="edm", preconditioning="edm", prediction="eps"), "needs diffusion.process='edm' and "
                                                                       "diffusion.prediction='x0'"),
        (dict(process="vdm", objective="simple", weighting="none"), "learned gamma trains it on the bound"),
        (dict(process="edm", weighting="sd3", prediction="x0"), "'sd3' \\(CosMap\\) is for diffusion.process='flow'"),
        (dict(process="edm", timestep_sampler="logit_normal", weighting="none"), "logit_normal"),
        (dict(process="flow", variance="learned_range", weighting="none"), "diffusion.variance='learned_range'"),
        (dict(process="flow", process_kwargs={"sigma_max": 3.0}, weighting="none"), "unknown setting"),
        (dict(process="discrete", prediction="velocity"), "diffusion.prediction='velocity' is not allowed"),
        (dict(process="discrete", timestep_kwargs={"logit_mean": 0.5}), "continuous diffusion.process"),
        (dict(process="wiener"), "diffusion.process='wiener' is not allowed"),
        (dict(process="flow", prediction="eps", weighting="none"), "prediction='eps' with diffusion.process='flow'"),
    ]
    for settings, message in cases:
        c = tiny_config("/nonexistent")
        for k, v in settings.items():
            c.diffusion[k] = v
        with pytest.raises(ValueError, match=message):
            config_lib.validate(c)
    c = config_for("flow")
    c.sampler.name = "plms"
    with pytest.raises(ValueError, match="sampler.name='plms' runs discrete schedules only"):
        config_lib.validate(c)
