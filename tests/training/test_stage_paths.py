"""End-to-end training through the other stage paths: a VQ autoencoder, pixel-space diffusion
(identity autoencoder, unconditional), class conditioning, and pretrained autoencoder / text
encoder sources (another run's workdir, a diffusers-format folder). Tiny models, 2 steps each.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config as config_lib
from ldm_jax.data import pipeline
from ldm_jax.interop import diffusers as hf
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.text_encoder import CLIPTextEncoder
from ldm_jax.models.unet import UNet
from ldm_jax.runs.checkpoint import StageCheckpoints
from ldm_jax.training import autoencoder_stage, ldm_stage, loop
from tests.models.test_unet import random_params
from tests.sizes import SMALL_SHAPES
from tests.training.tiny import ROOT, TINY_UNET, cheap_compilation, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _cheap_compilation():
    """The training loop's programs compile cheaply here (see tests/training/tiny.py)."""
    with cheap_compilation():
        yield


def small(config):
    """Fewer evaluation samples, no prompt-accuracy sweep (test_loop covers it), 2 sample prompts."""
    config.eval.num_samples = 8
    config.eval.splits = ()
    config.train.sample_prompts = ("a red circle on the left", "a blue square at the top")
    return config


def tiny(data_dir, ae_steps=2, ldm_steps=2):
    """tiny.py's config, `small`, with the one-level UNet: the stage paths, not the UNet, are
    under test here (test_loop trains the two-level one)."""
    c = small(tiny_config(data_dir, ae_steps=ae_steps, ldm_steps=ldm_steps))
    c.unet = dict(TINY_UNET)
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged(workdir, key):
    return [r[key] for r in read_metrics(workdir) if key in r]


@functools.lru_cache(maxsize=None)
def checkpoint(workdir, stage, step=None):
    """(step, state as saved, meta) of a stage's checkpoint (latest by default); read once."""
    ckpt = StageCheckpoints(workdir, stage)
    step = ckpt.latest_step() if step is None else step
    state, _, meta = ckpt.restore_raw(step)
    ckpt.close()
    return step, state, meta


def has_checkpoints(workdir, stage):
    return os.path.isdir(os.path.join(workdir, "checkpoints", stage))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def vq_scale_by_std(config, ae_params):
    """LDM's scale_by_std for a VQ model, recomputed here: 1 / std of its continuous latents of the
    run's first batch (no posterior to sample)."""
    batches = pipeline.make_batches(loop.data_config(config), None, process_index=0, process_count=1)
    module = autoencoder_stage.make_autoencoder(config.autoencoder, config.data.image_size)
    z = jax.jit(functools.partial(module.apply, method="encode"))({"params": ae_params}, next(batches)["image"])
    return 1.0 / float(jnp.std(z, ddof=1))


# ---------------------------------------------------------------------------------------------
# VQ autoencoder, both stages


def vq_config(shapes_dir):
    c = tiny(shapes_dir)
    c.autoencoder.kind = "vq"
    c.autoencoder.model = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    c.autoencoder.vq = dict(num_codes=16, beta=0.25)
    c.train.log_every = 1
    return c


@pytest.fixture(scope="module")
def vq_run(shapes_dir, tmp_path_factory):
    config = vq_config(shapes_dir)
    workdir = str(tmp_path_factory.mktemp("vq"))
    return config, workdir, loop.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_vq_autoencoder_trains_both_stages(vq_run):
    config, workdir, summary = vq_run
    assert summary["status"] == "done" and summary["step"] == 2
    ae_step, ae_state, _ = checkpoint(workdir, "autoencoder")
    ldm_step, ldm_state, meta = checkpoint(workdir, "ldm")
    assert ae_step == 2 and ldm_step == 2
    assert "quantize" in ae_state["params"]["autoencoder"]  # a VQ model was trained, not a KL one
    usage, perplexity = logged(workdir, "autoencoder/codebook_usage"), logged(workdir, "autoencoder/perplexity")
    assert len(usage) == 2 and all(0.0 < u <= 1.0 for u in usage)
    assert all(1.0 <= p <= 16.0 for p in perplexity)
    # The UNet sees the VQ model's 16x16x4 continuous latents, scaled by 1/std of the stage-1
    # model's latents of the first batch.
    assert config_lib.latent_shape(config) == (16, 16, 4)
    assert ldm_state["params"]["unet"]["conv_in"]["kernel"].shape[-2] == 4
    np.testing.assert_allclose(meta["scale_factor"],
                               vq_scale_by_std(config, ae_state["params"]["autoencoder"]), rtol=1e-5)
    losses = logged(workdir, "ldm/loss")
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert logged(workdir, "ldm/skipped_steps")[-1] == 0.0
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))


# ---------------------------------------------------------------------------------------------
# Pixel-space diffusion: configs/pixel_ddpm.py, tiny


@pytest.fixture(scope="module")
def pixel_run(shapes_dir, tmp_path_factory):
    config = small(config_lib.load_config(os.path.join(ROOT, "configs", "pixel_ddpm.py")))
    # 16x16 images (the shared 32x32 build, resized by the input pipeline): pixel-space UNets are costly.
    config.data.update(data_dir=shapes_dir, image_size=16, batch_size=8, options=dict(SMALL_SHAPES))
    config.unet = dict(TINY_UNET, dropout=0.1)
    config.optim.warmup_steps = 0
    config.sampler.num_steps = 3
    config.train.update(steps=2, log_every=1, checkpoint_every=2)
    workdir = str(tmp_path_factory.mktemp("pixel"))
    return config, workdir, loop.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_pixel_space_ddpm_trains_on_pixels(pixel_run):
    config, workdir, summary = pixel_run
    assert summary["status"] == "done" and summary["step"] == 2
    assert not has_checkpoints(workdir, "autoencoder")  # no stage 1
    step, state, meta = checkpoint(workdir, "ldm")
    assert step == 2 and meta["scale_factor"] == 1.0
    assert config_lib.latent_shape(config) == (16, 16, 3)  # the image itself
    unet = state["params"]["unet"]
    assert unet["conv_in"]["kernel"].shape[-2] == 3
    assert unet["conv_out"]["kernel"].shape[-1] == 6  # eps and the learned variance's interpolation
    assert set(state["params"]) == {"unet"}  # unconditional: no text encoder, no class embedder
    for key in ("ldm/loss", "ldm/vb"):
        values = logged(workdir, key)
        assert len(values) == 2 and np.all(np.isfinite(values)) and values[0] > 0
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))


@pytest.mark.slow
def test_pixel_space_ddpm_updates_are_taken(pixel_run):
    _, workdir, _ = pixel_run
    assert logged(workdir, "ldm/finite") == [1.0, 1.0] and logged(workdir, "ldm/skipped_steps")[-1] == 0.0


# ---------------------------------------------------------------------------------------------
# Class conditioning (shapes' `shape` label) on the VQ run's autoencoder, read from its workdir


@pytest.fixture(scope="module")
def class_run(vq_run, tmp_path_factory):
    """Stage 2 alone, class-conditional, with autoencoder.source="workdir:<the VQ run>"; records
    the autoencoder parameters handed to the LDM stage and the conditions the samples used."""
    other_config, other, _ = vq_run
    config = vq_config(other_config.data.data_dir)
    config.stages = ("ldm",)
    config.autoencoder.source = f"workdir:{other}"
    config.data.label_key = "shape"
    config.conditioning.update(kind="class", num_classes=3, caption_dropout=0.0)
    config.train.update(steps=2, checkpoint_every=1)
    config.train.sample_prompts = ("one", "two", "three", "four", "five")  # only their count matters
    workdir = str(tmp_path_factory.mktemp("class"))
    seen = {"conditions": []}
    run_ldm, conditions_for = loop.run_ldm, ldm_stage.conditions_for

    def spy_run_ldm(config, workdir, mesh, writer, preemption, ae_params):
        seen["ae_params"] = jax.device_get(ae_params)
        return run_ldm(config, workdir, mesh, writer, preemption, ae_params)

    def spy_conditions_for(models, prompts=None, labels=None, max_length=None):
        cond = conditions_for(models, prompts=prompts, labels=labels, max_length=max_length)
        seen["conditions"].append(np.asarray(cond))
        return cond

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "run_ldm", spy_run_ldm)
        mp.setattr(ldm_stage, "conditions_for", spy_conditions_for)
        summary = loop.train_and_evaluate(config, workdir)
    return config, workdir, summary, seen


@pytest.mark.slow
def test_class_conditional_ldm_learns_a_token_per_class(class_run):
    config, workdir, summary, seen = class_run
    assert summary["status"] == "done" and summary["step"] == 2
    _, before, _ = checkpoint(workdir, "ldm", step=1)
    _, after, _ = checkpoint(workdir, "ldm", step=2)
    assert set(after["params"]) == {"unet", "class_embedder"}  # no text encoder
    table = after["params"]["class_embedder"]
    assert table.shape == (4, 16)  # 3 shapes + the null class (classifier-free guidance), context width
    # The two batches hold all three shapes: their rows are being trained (Adam moves a row at
    # step 2 that had a gradient at step 1 or 2). Without caption dropout the null row never is.
    batches = pipeline.make_batches(loop.data_config(config), None, process_index=0, process_count=1)
    assert set(np.concatenate([next(batches)["label"] for _ in range(2)])) == {0, 1, 2}
    assert list(np.any(table != before["params"]["class_embedder"], axis=1)) == [True, True, True, False]
    losses = logged(workdir, "ldm/loss")
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and logged(workdir, "ldm/skipped_steps")[-1] == 0.0
    # Samples are drawn for real classes only: one per sample prompt, cycling through them.
    assert [list(c) for c in seen["conditions"]] == [[0, 1, 2, 0, 1]]
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))


@pytest.mark.slow
def test_autoencoder_from_another_runs_workdir(vq_run, class_run):
    """The class run trains no autoencoder: the LDM stage gets the VQ run's, as saved there, and
    so the same latent scale (1/std of the same first batch's latents)."""
    _, other, _ = vq_run
    _, workdir, _, seen = class_run
    assert not has_checkpoints(workdir, "autoencoder")
    assert_trees_equal(seen["ae_params"], checkpoint(other, "autoencoder")[1]["params"]["autoencoder"])
    np.testing.assert_allclose(checkpoint(workdir, "ldm")[2]["scale_factor"],
                               checkpoint(other, "ldm")[2]["scale_factor"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# A diffusers-format folder as the autoencoder and (frozen) text encoder


def write_diffusers_dir(config, path):
    """A random diffusers folder whose VAE and text encoder fit `config` (the UNet's weights are
    zeros: stage 2 trains its own). Returns the folder and the exported (VAE, text) params."""
    size, length = config.data.image_size, config.text_encoder.max_length
    vae = AutoencoderKL(**config.autoencoder.model.to_dict(), sample_size=size)
    text = CLIPTextEncoder(**config_lib.text_encoder_kwargs(config))
    unet = UNet(**config_lib.unet_kwargs(config))
    vae_params = random_params(vae, jnp.zeros((1, size, size, 3)), seed=1)
    text_params = random_params(text, jnp.zeros((1, length), jnp.int32), seed=2)
    h, w, c = config_lib.latent_shape(config)
    unet_params = jax.tree.map(np.zeros_like, random_params(
        unet, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), jnp.zeros((1, 1, unet.cross_attention_dim)), seed=3))
    components = hf.DiffusersComponents(
        unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
        text_encoder_params=text_params, tokenizer=None,
        schedule=dict(name="scaled_linear", num_timesteps=1000, prediction="eps", spacing="leading", steps_offset=1))
    return hf.export_diffusers_dir(path, components), vae_params, text_params


@pytest.mark.slow
def test_diffusers_autoencoder_and_frozen_text_encoder(shapes_dir, tmp_path, monkeypatch):
    config = tiny(shapes_dir)
    folder, vae_params, text_params = write_diffusers_dir(config, tmp_path / "sd")
    config.stages = ("ldm",)
    config.autoencoder.update(source=f"diffusers:{folder}", scale_factor=0.18215)
    config.text_encoder.update(source=f"diffusers:{folder}", train=False)
    seen = {}
    original = loop.run_stage

    def spy(name, **kwargs):
        seen[name] = kwargs["frozen"]
        return original(name, **kwargs)

    monkeypatch.setattr(loop, "run_stage", spy)
    workdir = str(tmp_path / "run")
    summary = loop.train_and_evaluate(config, workdir)

    assert summary["status"] == "done" and summary["step"] == 2
    assert not has_checkpoints(workdir, "autoencoder")
    step, state, meta = checkpoint(workdir, "ldm")
    assert step == 2 and meta["scale_factor"] == 0.18215  # the config's, not estimated
    assert set(state["params"]) == {"unet"}  # the text encoder is not trained
    # The frozen networks the steps read are the folder's, unchanged after the training steps.
    assert_trees_equal(seen["ldm"]["autoencoder"], vae_params)
    assert_trees_equal(seen["ldm"]["text_encoder"], text_params)
    losses = logged(workdir, "ldm/loss")
    assert len(losses) == 1 and np.all(np.isfinite(losses)) and logged(workdir, "ldm/skipped_steps") == [0.0]
    assert os.path.exists(os.path.join(workdir, "samples", "step_0000002.png"))
