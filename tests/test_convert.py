"""python -m ldm_jax.convert: a run exported to diffusers reproduces our images in diffusers'
StableDiffusionPipeline; a diffusers folder imported as a workdir samples like the folder and
resumes as a training run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax import convert  # noqa: E402
from ldm_jax import config as config_lib  # noqa: E402
from ldm_jax.interop import diffusers as hf  # noqa: E402
from ldm_jax.models.text_encoder import tokenize  # noqa: E402
from ldm_jax.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_jax.runs.checkpoint import StageCheckpoints  # noqa: E402
from ldm_jax.runs.workdir import load_workdir_config  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.training import ldm_stage# noqa: E402
from tests.test_pipeline import blob_images, make_workdir, tiny_sd_pipeline, workdir_config  # noqa: E402
from tests.training.tiny import CHEAP_COMPILE  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _diffusers_images(path, latents, steps, guidance):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                    latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy())).images


def test_exported_run_reproduces_our_images_in_diffusers(tmp_path):
    run = make_workdir(tmp_path / "run", workdir_config(**{"sampler.name": "ddim"}), scale=0.8)
    out = convert.workdir_to_diffusers(run, str(tmp_path / "export"))
    index = json.loads(open(os.path.join(out, "model_index.json")).read())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert json.loads(open(os.path.join(out, "vae", "config.json")).read())["scaling_factor"] == pytest.approx(0.8)

    ours_pipe = LatentDiffusionPipeline.from_workdir(run)
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4)))
    ours = ours_pipe.text_to_image(PROMPTS, sampler="ddim", num_steps=4, guidance_scale=3.0, latents=latents,
                                   output_type="float")
    ref = _diffusers_images(out, latents, 4, 3.0)
    err = np.abs(ours - ref).max()
    print(f"\nexported run in diffusers (ddim, trailing, 4 steps, guidance 3): max |ours - diffusers| = {err:.2e}")
    assert ref.std() > 0.02 and err < 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny SD folder (DDIM, trailing spacing: a workdir has no steps_offset) and its import."""
    root = tmp_path_factory.mktemp("import")
    pipe = tiny_sd_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                         steps_offset=0)
    src = root / "sd"
    pipe.save_pretrained(str(src), safe_serialization=True)
    workdir = convert.diffusers_to_workdir(str(src), str(root / "workdir"))
    return str(src), workdir


def test_imported_workdir_samples_like_the_folder(imported):
    src, workdir = imported
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "config.py"]
    pipe = LatentDiffusionPipeline.from_workdir(workdir)
    assert pipe.info["step"] == 0 and pipe.scale_factor == pytest.approx(0.5)
    assert pipe.defaults.sampler == "ddim" and pipe.schedule["spacing"] == "trailing"
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4)))
    ours = pipe.text_to_image(PROMPTS, num_steps=5, guidance_scale=3.0, latents=latents, output_type="float")
    ref = _diffusers_images(src, latents, 5, 3.0)
    err = np.abs(ours - ref).max()
    print(f"\nimported workdir vs its diffusers folder in diffusers: max |ours - diffusers| = {err:.2e}")
    assert err < 1e-4
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert.diffusers_to_workdir(src, workdir)


def test_imported_workdir_resumes_as_a_training_run(imported):
    """What run_stage does on resume (validate, restore against init_state's shapes with
    shardings), then one real train step with the frozen autoencoder and text encoder of the
    folder: the step count moves to 1, and AdamW's first update from a fresh optimiser state
    moves every UNet parameter by the config's learning rate (bias-corrected, m / sqrt(v) =
    g / |g|; no weight decay), and the EMA by its warm-up decay min(0.9999, 1/10) at step 0."""
    src, workdir = imported
    config = config_lib.load_config(os.path.join(workdir, "config.py"))
    config_lib.validate(config)
    assert config.to_dict() == load_workdir_config(workdir).to_dict()
    models = ldm_stage.build_models(config)
    mesh = sharding.make_mesh()
    abstract = jax.eval_shape(lambda r: ldm_stage.init_state(config, models, r), jax.random.PRNGKey(config.seed))
    shardings = sharding.tree_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = StageCheckpoints(workdir, "ldm")
    state, _, meta = ckpt.restore(target)
    ckpt.close()
    assert int(state.step) == 0 and meta["scale_factor"] == pytest.approx(0.5)

    c = hf.load_diffusers_dir(src)
    frozen = {"autoencoder": c.vae_params, "text_encoder": c.text_encoder_params, "scale": np.float32(0.5)}
    batch = {"image": jnp.asarray(blob_images(4, 16), jnp.float32) / 127.5 - 1.0,
             "ids": jnp.asarray(tokenize(c.tokenizer, PROMPTS * 2, config.text_encoder.max_length))}
    before, ema_before = jax.device_get((state.params, state.ema_params))
    step = jax.jit(ldm_stage.make_train_step(config, models), compiler_options=CHEAP_COMPILE)
    new_state, metrics = jax.device_get(step(state, batch, frozen))
    assert int(new_state.step) == 1 and bool(metrics["finite"]) and int(new_state.nonfinite) == 0
    assert set(new_state.params) == {"unet"}  # the text encoder stays frozen, in `frozen`

    lr, o = config.optim.lr, config.optim
    assert (lr, o.warmup_steps, o.weight_decay) == (1e-5, 0, 0.0)
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(new_state.params),
                                                                   jax.tree.leaves(before))])
    # Within float32 rounding; the few entries whose |g| is near Adam's eps move less.
    assert np.mean(np.abs(moved / lr - 1) < 0.05) > 0.99, np.percentile(moved / lr, [1, 50, 99])
    for a, e, p in zip(jax.tree.leaves(new_state.ema_params), jax.tree.leaves(ema_before),
                       jax.tree.leaves(new_state.params)):
        np.testing.assert_allclose(a, 0.1 * e + 0.9 * p, rtol=1e-6, atol=1e-7)


def test_bad_conversions_are_named(tmp_path):
    inpainting = tmp_path / "inpaint"
    tiny_sd_pipeline(unet_in_channels=9).save_pretrained(str(inpainting), safe_serialization=True)
    with pytest.raises(ValueError, match="takes 9 channels"):
        convert.diffusers_to_workdir(str(inpainting), str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.workdir_to_diffusers(str(tmp_path / "missing"), str(tmp_path / "out"))
    class_run = make_workdir(tmp_path / "class", workdir_config(**{
        "conditioning.kind": "class", "conditioning.num_classes": 3, "data.label_key": "label",
        "data.caption_key": None}))
    with pytest.raises(ValueError, match="only text-conditional models export"):
        convert.workdir_to_diffusers(class_run, str(tmp_path / "out"))
