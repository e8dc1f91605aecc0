"""A flow-matching run end to end: trained by the loop, sampled by the pipeline, measured by the
metrics (its likelihood through the ODE; no variational bound), exported with diffusers'
FlowMatchEulerDiscreteScheduler config."""
import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.evaluation import runner
from ldm_jax.evaluation.run import EvalOptions, MetricUnavailable
from ldm_jax.pipeline import LatentDiffusionPipeline
from ldm_jax.runs import run_record
from ldm_jax.training import diffusers_runs, loop
from tests.training.tiny import TINY_UNET, cheap_compilation, tiny_config


def _trained_run(shapes_dir, tmp_path_factory, name: str, sampler: str, **diffusion):
    """A tiny run (2 + 2 steps, one-level UNet) of the process `diffusion` describes."""
    c = tiny_config(shapes_dir, ae_steps=2, ldm_steps=2)
    c.unet = dict(TINY_UNET)
    c.diffusion.update(diffusion)
    c.sampler.update(name=sampler, num_steps=2)
    c.eval.splits = ()  # the pipeline and the metrics are under test here, not the end-of-run sweep
    workdir = str(tmp_path_factory.mktemp(name))
    return workdir, loop.train_and_evaluate(c, workdir)


@pytest.fixture(scope="module", autouse=True)
def _cheap_compilation():
    """The loop's and the pipelines' programs compile cheaply here (see tests/training/tiny.py)."""
    with cheap_compilation():
        yield


@pytest.fixture(scope="module")
def flow_run(shapes_dir, tmp_path_factory):
    return _trained_run(shapes_dir, tmp_path_factory, "flow", "euler", process="flow", process_kwargs={"shift": 2.0},
                        prediction="velocity", weighting="none", timestep_sampler="logit_normal")


@pytest.mark.slow
def test_flow_run_trains_samples_measures_and_exports(flow_run, tmp_path):
    workdir, summary = flow_run
    assert summary["status"] == "done"
    with open(os.path.join(workdir, "config.json")) as f:
        stored = json.load(f)
    assert stored["diffusion"]["process"] == "flow" and stored["config_version"] == run_record.CONFIG_VERSION

    pipe = LatentDiffusionPipeline.from_workdir(workdir)
    assert pipe.model.process.name == "flow" and pipe.model.process.shift == 2.0
    z = pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=0, output_type="latent")
    again = pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=0, output_type="latent")
    assert np.all(np.isfinite(np.asarray(z))) and np.array_equal(np.asarray(z), np.asarray(again))
    images = pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=0, sampler="heun")
    assert images.dtype == np.uint8 and images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        pipe.text_to_image(["a red circle on the left"], num_steps=2, sampler="plms")
    # Inpainting with a 4-channel UNet puts the known region back at the flow's noise level after
    # every step: after the last, exactly the image's latents. A progress bar ticks on a flow model.
    image = pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=1)
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, :, 16:] = 1.0  # repaint the right half
    painted = np.asarray(pipe.inpaint(image, mask, ["a blue square on the right"], num_steps=2, seed=0,
                                      output_type="latent"))
    known, f = pipe.encode(image), pipe.downsampling_factor
    np.testing.assert_allclose(painted[:, :, :16 // f], known[:, :, :16 // f], atol=1e-5)
    assert np.abs(painted[:, :, 16 // f:] - known[:, :, 16 // f:]).max() > 0.1
    ticking = LatentDiffusionPipeline.from_workdir(workdir, progress=True)
    ticked = ticking.text_to_image(["a red circle on the left"], num_steps=2, seed=0, output_type="latent")
    assert np.array_equal(np.asarray(ticked), np.asarray(z))
    with pytest.raises(ValueError, match="with_spacing sets a discrete-time schedule; this model's process is 'flow'"):
        pipe.with_spacing("trailing")
    with pytest.raises(ValueError, match="with_scheduler sets a discrete-time schedule; this model's process is"):
        pipe.with_scheduler({"_class_name": "DDIMScheduler"})

    options = EvalOptions(splits=("test",), bpd_examples=4, bpd_batch_size=4, ode_steps=4)
    ode = runner.evaluate(workdir, ["ode_bpd"], options)["ode_bpd"]["result"]
    assert ode["process"] == "flow" and np.isfinite(ode["total"]) and ode["estimator_ci95"] > 0
    assert ode["ode_steps"] == 4
    with pytest.raises(MetricUnavailable, match="'flow' process has no variational bound"):
        runner.evaluate(workdir, ["bpd"], options)

    out = diffusers_runs.workdir_to_diffusers(workdir, str(tmp_path / "export"))
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.0
    diffusers = pytest.importorskip("diffusers")
    loaded = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    loaded.set_timesteps(4)
    assert float(loaded.sigmas[0]) == 1.0 and jax.numpy.isfinite(float(loaded.sigmas[1]))

    # The export samples as the run does: diffusers' UNet, text encoder and FlowMatchEulerDiscrete
    # scheduler (its shift; on our grid shift(linspace(1, 0, N + 1)): diffusers' own default
    # ends at shift(1/1000)), in a guided loop written as diffusers' pipelines write it.
    torch = pytest.importorskip("torch")
    steps, guidance = 3, 2.5
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(0), np.shape(z)))
    ours = np.asarray(pipe.text_to_image(["a red circle on the left"], num_steps=steps, guidance_scale=guidance,
                                         sampler="euler", latents=latents, output_type="latent"))
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    scheduler = ref_pipe.scheduler
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    with torch.no_grad():
        cond, uncond = ref_pipe.encode_prompt(["a red circle on the left"], "cpu", 1, True, [""])
        context = torch.cat([uncond, cond])
        x = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
        for t in scheduler.timesteps:
            out_u, out_c = ref_pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    ref = x.numpy().transpose(0, 2, 3, 1)
    err = np.abs(ours - ref).max()
    print(f"\nflow export in diffusers (FlowMatchEuler, shift 2, 3 steps, guidance 2.5): max |ours - diffusers| = "
          f"{err:.2e}")
    assert np.abs(ref - latents).max() > 0.1 and err < 1e-4


@pytest.fixture(scope="module")
def vdm_run(shapes_dir, tmp_path_factory):
    return _trained_run(shapes_dir, tmp_path_factory, "vdm", "dpm_solver++", process="vdm", prediction="eps", objective="vlb",
                        weighting="none")


@pytest.mark.slow
def test_vdm_run_loads_its_learned_schedule_and_gets_its_bound(vdm_run):
    """A VDM run's learned gamma is part of its checkpoint: the pipeline samples with it (another
    gamma gives other samples), and `bpd` gives VDM's continuous-time bound with it (the ODE's
    likelihood with a learned gamma: tests/diffusion/test_ode_likelihood.py)."""
    workdir, summary = vdm_run
    assert summary["status"] == "done"
    pipe = LatentDiffusionPipeline.from_workdir(workdir)
    gamma = pipe.params["process"]
    assert pipe.model.process.name == "vdm" and jax.tree_util.tree_leaves(gamma)
    z = np.asarray(pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=0, output_type="latent"))
    assert np.all(np.isfinite(z))
    pipe.params = dict(pipe.params, process=jax.tree_util.tree_map(lambda p: p * 1.5, gamma))
    other = np.asarray(pipe.text_to_image(["a red circle on the left"], num_steps=2, seed=0, output_type="latent"))
    assert np.abs(other - z).max() > 1e-3

    options = EvalOptions(splits=("test",), bpd_examples=4, bpd_batch_size=4)
    bound = runner.evaluate(workdir, ["bpd"], options)["bpd"]["result"]
    assert bound["process"] == "vdm" and np.isfinite(bound["total"]) and bound["diffusion"] > 0
