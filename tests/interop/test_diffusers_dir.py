"""diffusers-format folders: load a tiny saved StableDiffusionPipeline, compare with the torch
modules, export it back and load the export with diffusers; bad folders; scheduler configs."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldm_jax.diffusion.schedules import make_schedule  # noqa: E402
from ldm_jax.interop import clip_weights, unet_weights, vae_weights  # noqa: E402
from ldm_jax.interop import diffusers as hf  # noqa: E402
from ldm_jax.models import text_encoder as te  # noqa: E402
from tests.torch_random import randomize_torch as _randomize

TEXT_DIM = 32


def _tiny_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
        cross_attention_dim=TEXT_DIM, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
        sample_size=16, layers_per_block=1)
    # The real CLIP vocabulary size (the tokenizer emits ids up to 49407) with a tiny width.
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77))
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, i)
    scheduler = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, skip_prk_steps=True, steps_offset=1,
                                        set_alpha_to_one=False)
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=te.make_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _assert_same_state(ref_module, ours):
    ref = {k: v for k, v in _sd(ref_module).items() if not k.endswith("position_ids")}
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = _tiny_pipeline()
    path = tmp_path_factory.mktemp("sd_tiny")
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe, path


@pytest.fixture(scope="module")
def loaded(saved):
    return hf.load_diffusers_dir(saved[1])


def test_loaded_weights_are_the_saved_tensors(saved, loaded):
    pipe, _ = saved
    c = loaded
    _assert_same_state(pipe.unet, unet_weights.unet_state_dict_from_params(
        c.unet_params, hf.module_kwargs(c.unet)))
    _assert_same_state(pipe.vae, vae_weights.vae_state_dict_from_params(
        c.vae_params, hf.module_kwargs(c.vae)))
    _assert_same_state(pipe.text_encoder, clip_weights.text_encoder_state_dict_from_params(
        c.text_encoder_params))
    assert c.schedule == dict(name="scaled_linear", num_timesteps=1000, zero_terminal_snr=False,
                              prediction="eps", spacing="leading", steps_offset=1)
    prompts = ["a photo of a cat", ""]
    ref_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77,
                             truncation=True)["input_ids"]
    np.testing.assert_array_equal(te.tokenize(c.tokenizer, prompts), ref_ids)


def test_loaded_models_match_torch_outputs(saved, loaded):
    pipe, c = saved[0], loaded
    ids = te.tokenize(c.tokenizer, ["a photo of a cat", "a red circle"])
    with torch.no_grad():
        ref_text = pipe.text_encoder(torch.from_numpy(ids).long())
    hidden, pooled = c.text_encoder.apply({"params": c.text_encoder_params}, ids)
    errs = {"text hidden": np.abs(np.asarray(hidden) - ref_text.last_hidden_state.numpy()).max(),
            "text pooled": np.abs(np.asarray(pooled) - ref_text.pooler_output.numpy()).max()}

    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)  # NHWC
    t = np.array([10, 900], np.int32)
    with torch.no_grad():
        ref_eps = pipe.unet(torch.from_numpy(z.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                            ref_text.last_hidden_state).sample.numpy().transpose(0, 2, 3, 1)
        ref_img = pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
    eps = c.unet.apply({"params": c.unet_params}, jnp.asarray(z), jnp.asarray(t), hidden)
    img = c.vae.apply({"params": c.vae_params}, jnp.asarray(z), method="decode")
    errs["unet"] = np.abs(np.asarray(eps) - ref_eps).max() / max(1, np.abs(ref_eps).max())
    errs["vae decode"] = (np.abs(np.asarray(img) - ref_img.transpose(0, 2, 3, 1)).max()
                          / max(1, np.abs(ref_img).max()))
    print("\nfolder load, max abs err (relative to max(1,|ref|)): "
          + ", ".join(f"{k} {float(v):.2e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v <= 1e-4, (k, v)


def test_from_torch_objects_equal_folder_load(saved, loaded):
    pipe, c = saved[0], loaded
    pairs = [(hf.unet_from_diffusers(pipe.unet), c.unet, c.unet_params),
             (hf.autoencoder_from_diffusers(pipe.vae), c.vae, c.vae_params),
             (hf.text_encoder_from_transformers(pipe.text_encoder), c.text_encoder,
              c.text_encoder_params)]
    for (module, params), ref_module, ref_params in pairs:
        assert module == ref_module
        leaves = lambda tree: jax.tree_util.tree_leaves_with_path(tree)
        assert [p for p, _ in leaves(params)] == [p for p, _ in leaves(ref_params)]
        for (path, a), (_, b) in zip(leaves(params), leaves(ref_params)):
            np.testing.assert_array_equal(a, b, err_msg=str(path))
    module, _ = hf.text_encoder_from_transformers(pipe.text_encoder, dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16


def test_export_loads_in_diffusers_with_identical_weights(saved, loaded, tmp_path):
    pipe = saved[0]
    out = hf.export_diffusers_dir(tmp_path / "export", loaded)
    back = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert back.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        ref, got = _sd(getattr(pipe, name)), _sd(getattr(back, name))
        assert set(got) == set(ref), name
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}: {k}")
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "steps_offset",
                "prediction_type", "timestep_spacing"):
        assert back.scheduler.config[key] == pipe.scheduler.config[key], key
    prompts = ["an astronaut riding a horse", ""]
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert back.tokenizer(prompts, **kw)["input_ids"] == pipe.tokenizer(prompts, **kw)["input_ids"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (out / "tokenizer").iterdir()}
    # ... and our loader reads our export back.
    again = hf.load_diffusers_dir(out)
    assert again.schedule == loaded.schedule
    np.testing.assert_array_equal(again.unet_params["conv_in"]["kernel"],
                                  loaded.unet_params["conv_in"]["kernel"])


def test_export_builds_scheduler_from_schedule(loaded, tmp_path):
    import dataclasses

    schedule = dict(name="scaled_linear", num_timesteps=1000, zero_terminal_snr=True,
                    prediction="v", spacing="trailing", steps_offset=0)
    c = dataclasses.replace(loaded, schedule=schedule, scheduler_config=None, tokenizer=None)
    out = hf.export_diffusers_dir(tmp_path / "export", c)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler"
    assert hf.schedule_from_scheduler_config(config) == schedule
    sched = diffusers.DDIMScheduler.from_pretrained(str(out / "scheduler"))
    assert sched.config.rescale_betas_zero_snr and sched.config.prediction_type == "v_prediction"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_component_folder_is_named(saved, tmp_path):
    bad = _copy(saved[1], tmp_path / "bad")
    shutil.rmtree(bad / "unet")
    with pytest.raises(FileNotFoundError, match=r"unet"):
        hf.load_diffusers_dir(bad)
    (bad / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        hf.load_diffusers_dir(bad)


def test_truncated_safetensors_is_named(saved, tmp_path):
    bad = _copy(saved[1], tmp_path / "bad")
    f = bad / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        hf.load_diffusers_dir(bad)


def test_shape_mismatch_is_named(saved, tmp_path):
    bad = _copy(saved[1], tmp_path / "bad")
    cfg_path = bad / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"(?s)text_encoder/model\.safetensors.*mis-shaped.*fc1\.weight") as e:
        hf.load_diffusers_dir(bad)
    assert "got (64, 32), expected shape (48, 32)" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Scheduler configs

SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD2_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
         "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
         "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
ZERO_SNR = {**SD2_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
            "steps_offset": 0}
LINEAR_500 = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0002,
              "beta_end": 0.03, "num_train_timesteps": 500, "prediction_type": "sample"}
COSINE = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2",
          "num_train_timesteps": 1000}


@pytest.mark.parametrize("config,expected", [
    (SD15, dict(name="scaled_linear", num_timesteps=1000, zero_terminal_snr=False,
                prediction="eps", spacing="leading", steps_offset=1)),
    (SD2_V, dict(name="scaled_linear", num_timesteps=1000, zero_terminal_snr=False,
                 prediction="v", spacing="leading", steps_offset=1)),
    (ZERO_SNR, dict(name="scaled_linear", num_timesteps=1000, zero_terminal_snr=True,
                    prediction="v", spacing="trailing", steps_offset=0)),
    (LINEAR_500, dict(name="linear", num_timesteps=500, zero_terminal_snr=False,
                      beta_start=0.0002, beta_end=0.03, rescale=False, prediction="x0",
                      spacing="leading", steps_offset=0)),
    (COSINE, dict(name="cosine", num_timesteps=1000, zero_terminal_snr=False, prediction="eps",
                  spacing="linspace", steps_offset=0)),
], ids=["sd15", "sd2_v", "zero_snr", "linear_500", "cosine"])
def test_schedule_from_scheduler_config(config, expected):
    got = hf.schedule_from_scheduler_config(config)
    assert got == expected
    # The schedule we build has the alphas_cumprod of diffusers' own scheduler for that config.
    sched = make_schedule(**{k: v for k, v in got.items() if k not in hf.SAMPLING_KEYS})
    cls = getattr(diffusers, config["_class_name"])
    ref = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    ref_abar = ref.alphas_cumprod.double().numpy()
    if config is COSINE:  # diffusers' Euler clamps the terminal alphas_cumprod; compare the rest
        ref_abar, ours = ref_abar[:-1], sched.alphas_cumprod[:-1]
    else:
        ours = sched.alphas_cumprod
    np.testing.assert_allclose(ours, ref_abar, rtol=2e-5, atol=1e-7)
    if got["zero_terminal_snr"]:
        assert sched.alphas_cumprod[-1] < 1e-12


@pytest.mark.parametrize("key,value", [("beta_schedule", "sigmoid"),
                                       ("prediction_type", "flow"),
                                       ("timestep_spacing", "karras"),
                                       ("trained_betas", [0.1, 0.2])])
def test_unsupported_scheduler_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        hf.schedule_from_scheduler_config({**SD15, key: value})
