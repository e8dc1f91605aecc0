"""End to end against diffusers' Stable Diffusion pipelines, on tiny random folders with the real
SD 1.5 / SD 2.1 / SD-inpainting layouts and scheduler configs (tests/sd_folders.py).

Each test gives both sides the same noise: the initial latents (`latents=`), and where diffusers
draws noise itself (img2img's and inpainting's add_noise, the ancestral schedulers' steps) its
randn_tensor is replaced by our draws. diffusers encodes init images with a posterior *sample*;
ours uses the posterior mean, so diffusers' retrieve_latents is pointed at the mean here. The
final latents (output_type="latent") must agree within 5e-5 of their scale.
"""
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ldm_jax.diffusion import noise as noise_lib, sd_schedulers  # noqa: E402
from ldm_jax.pipeline import LatentDiffusionPipeline  # noqa: E402
from tests.training.tiny import cheap_programs  # noqa: E402
from tests.sd_folders import sd_folder_and_pipeline  # noqa: E402

PROMPTS = ["a red circle on the left", "two blue squares"]
NEGATIVE = ["blurry", ""]
STEPS = 10
TOL = 5e-5
SEED = 11


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (our pipeline, diffusers' pipeline) for sd15, sd21 and sd_inpaint. While this
    module runs, the pipelines compile with XLA:CPU's cheapest settings (tests/training/tiny.py's
    CHEAP_COMPILE): the same arithmetic, compiled in a fraction of the time."""
    with cheap_programs():
        out = {}
        for kind in ("sd15", "sd21", "sd_inpaint"):
            path, ref = sd_folder_and_pipeline(tmp_path_factory.mktemp(kind) / kind, kind)
            ref.set_progress_bar_config(disable=True)
            out[kind] = (LatentDiffusionPipeline.from_diffusers_dir(str(path)), ref)
        yield out


def _nchw(x):
    return torch.tensor(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))


def _nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


class _Feed:
    """diffusers' randn_tensor, handing out our noise (NHWC arrays) in order."""

    def __init__(self, arrays):
        self.arrays, self.calls = list(arrays), 0

    def __call__(self, shape, *args, **kwargs):
        z = _nchw(self.arrays[self.calls]).reshape(shape)
        self.calls += 1
        return z


def _mean_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def _patch_encoder(monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint

    monkeypatch.setattr(img2img, "retrieve_latents", _mean_latents)
    monkeypatch.setattr(inpaint, "retrieve_latents", _mean_latents)
    return img2img, inpaint


def _latent_shape(pipe, batch):
    h = pipe.default_size // pipe.downsampling_factor
    return (batch, h, h, pipe.latent_channels)


def _check(ours, ref, what):
    err, scale = float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))
    print(f"{what}: max |ours - diffusers| = {err:.2e} (latent scale {scale:.2f})")
    assert err <= TOL * max(scale, 1.0), what


def _our_step_noise(seed, shape, num_evaluations):
    """The step noise our pipeline draws for images seed, seed + 1, ...: image i's key is
    PRNGKey(seed + i), split in two (the second half samples); the loop splits that again and
    draws from the second half (`sd_schedulers.step_noise`)."""
    keys = jnp.stack([jax.random.PRNGKey(seed + i) for i in range(shape[0])])
    sample_keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)[:, 1]
    loop_key = noise_lib.split(sample_keys, 2)[1]
    return np.asarray(sd_schedulers.step_noise(loop_key, shape, num_evaluations))


# (folder, scheduler class or None for the folder's own, from_config overrides, guidance rescale)
TEXT_CASES = {
    "sd15_pndm": ("sd15", None, {}, 0.0),
    "sd21_ddim_v_rescale": ("sd21", None, {}, 0.7),
    "sd15_euler_a": ("sd15", "EulerAncestralDiscreteScheduler", {}, 0.0),
    "sd21_heun": ("sd21", "HeunDiscreteScheduler", {}, 0.0),
    "sd15_euler_karras": ("sd15", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 0.0),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_to_image_matches_stable_diffusion_pipeline(folders, case, monkeypatch):
    kind, cls, overrides, rescale = TEXT_CASES[case]
    ours, ref = folders[kind]
    if cls is not None:  # a pipeline of its own: the shared one keeps the folder's scheduler
        scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **overrides)
        ref = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": scheduler})
        ref.set_progress_bar_config(disable=True)
        ours = ours.with_scheduler(ref.scheduler)
    rng = np.random.default_rng(1)
    shape = _latent_shape(ours, len(PROMPTS))
    z_T = rng.standard_normal(shape).astype(np.float32)
    if sd_schedulers.is_stochastic(ours.scheduler):  # diffusers gets the noise our loop draws
        module = inspect.getmodule(type(ref.scheduler))
        K = len(sd_schedulers.plan(ours.scheduler, STEPS)["t"])
        monkeypatch.setattr(module, "randn_tensor", _Feed(_our_step_noise(SEED, shape, K)))
    for r in sorted({0.0, rescale}):  # guidance rescale is traced: one compiled program serves both
        want = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   guidance_rescale=r, latents=_nchw(z_T), output_type="latent").images
        got = ours.text_to_image(PROMPTS, negative_prompts=NEGATIVE, num_steps=STEPS, guidance_scale=7.5,
                                 guidance_rescale=r, latents=z_T, output_type="latent", seed=SEED)
        _check(got, _nhwc(want), f"{case}, guidance rescale {r}")
    assert ours.defaults.sampler == "scheduler"


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_image_to_image_matches_img2img_pipeline(folders, strength, monkeypatch):
    ours, ref = folders["sd15"]
    img2img_module, _ = _patch_encoder(monkeypatch)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(3)
    images = np.tanh(rng.standard_normal((len(PROMPTS), ours.default_size, ours.default_size, 3))).astype(np.float32)
    noise = rng.standard_normal(_latent_shape(ours, len(PROMPTS))).astype(np.float32)
    monkeypatch.setattr(img2img_module, "randn_tensor", _Feed([noise]))
    want = pipe(PROMPTS, image=_nchw((images + 1) / 2), strength=strength, negative_prompt=NEGATIVE,
                num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent").images
    got = ours.image_to_image(images, PROMPTS, strength=strength, negative_prompts=NEGATIVE, num_steps=STEPS,
                              guidance_scale=7.5, latents=noise, output_type="latent")
    _check(got, _nhwc(want), f"img2img strength {strength}")


def _masks(size, batch):
    m = np.zeros((batch, size, size), np.float32)
    m[:, size // 4: 3 * size // 4, : size // 2] = 1.0
    m[1, :, -5:] = 1.0  # not aligned to the latent grid: the nearest-pixel rule decides
    return m


@pytest.mark.parametrize("kind, strength", [("sd_inpaint", 1.0), ("sd_inpaint", 0.6), ("sd15", 1.0)])
def test_inpaint_matches_inpaint_pipeline(folders, kind, strength, monkeypatch):
    """9-channel SD inpainting, and the legacy latent blend with a 4-channel UNet."""
    ours, ref = folders[kind]
    _, inpaint_module = _patch_encoder(monkeypatch)
    pipe = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(4)
    size = ours.default_size
    images = np.tanh(rng.standard_normal((len(PROMPTS), size, size, 3))).astype(np.float32)
    masks = _masks(size, len(PROMPTS))
    noise = rng.standard_normal(_latent_shape(ours, len(PROMPTS))).astype(np.float32)
    kwargs = {}
    if strength == 1.0:
        kwargs["latents"] = _nchw(noise)
    else:
        monkeypatch.setattr(inpaint_module, "randn_tensor", _Feed([noise]))
    want = pipe(PROMPTS, image=_nchw((images + 1) / 2), mask_image=torch.tensor(masks[:, None]), strength=strength,
                negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=size, width=size,
                output_type="latent", **kwargs).images
    got = ours.inpaint(images, masks, PROMPTS, strength=strength, negative_prompts=NEGATIVE, num_steps=STEPS,
                       guidance_scale=7.5, latents=noise, output_type="latent")
    _check(got, _nhwc(want), f"inpaint {kind} strength {strength}")
