"""LoRA parity with diffusers + peft (parity extra): our export loads in diffusers' pipeline and samples
the same final latents; a file diffusers writes (peft format, alpha in the metadata) samples the same
in ours at scales 1 and 0.5; kohya and diffusers' older keys read to the same adapters; bad files
name the file and the key. (Merging vs the adapted forward, and a trained LoRA in diffusers:
tests/training/test_lora_step.py.)

One tiny random SD folder (UNet (32, 64), one layer, 32-wide context, 8x8 latents; a one-layer CLIP)
with the Euler scheduler; every pipeline shares one compiled program (a LoRA only changes the
parameters)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ldm_jax.interop import lora_weights  # noqa: E402
from ldm_jax.models import lora  # noqa: E402
from ldm_jax.models import text_encoder as te  # noqa: E402
from ldm_jax.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_jax.runtime.files import load_safetensors  # noqa: E402
from tests.torch_random import randomize_torch  # noqa: E402
from tests.training.tiny import cheap_programs  # noqa: E402

PROMPTS = ["a photo of a cat", "a red circle"]
STEPS, GUIDANCE = 3, 3.0
UNET_TARGETS = list(lora_weights.UNET_TARGETS)
TEXT_TARGETS = list(lora_weights.TEXT_ENCODER_TARGETS)


def tiny_sd_pipeline(seed: int = 0):
    """A tiny random diffusers StableDiffusionPipeline with SD 1.5's Euler scheduler settings."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
        layers_per_block=1)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77))
    for i, m in enumerate((unet, vae, text)):
        randomize_torch(m, seed + i)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="leading", steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=te.make_tokenizer(), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd_lora")
    tiny_sd_pipeline().save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def ours(folder):
    """Our pipeline of the folder, compiling with XLA:CPU's cheapest settings (CHEAP_COMPILE: the same
    arithmetic in a fraction of the compile time); every with_lora copy shares its program."""
    with cheap_programs():
        yield LatentDiffusionPipeline.from_diffusers_dir(str(folder))


@pytest.fixture(scope="module")
def z_T():
    return np.random.default_rng(0).standard_normal((len(PROMPTS), 8, 8, 4)).astype(np.float32)


def diffusers_latents(pipe, z_T, **kwargs):
    """diffusers' final latents (NHWC) for PROMPTS from x_T = z_T."""
    with torch.no_grad():
        out = pipe(PROMPTS, latents=torch.from_numpy(z_T.transpose(0, 3, 1, 2)), num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, output_type="latent", **kwargs).images
    return out.numpy().transpose(0, 2, 3, 1)


def our_latents(pipe, z_T):
    return pipe.text_to_image(PROMPTS, latents=z_T, num_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent")


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def random_adapters(params, targets, rank, seed):
    """Adapters with random, nonzero A and B (a trained LoRA, not a fresh one)."""
    tree = lora.init_adapters(jax.random.PRNGKey(seed), params, lora_weights.target_paths(params, targets), rank)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def torch_lora_dir(folder, tmp_path_factory):
    """A LoRA trained-and-saved the diffusers way: peft adapters (r 4, alpha 8 on the UNet; r 2,
    alpha 1 on the text encoder) with random nonzero lora_B, written by save_lora_weights with the
    adapter metadata (as diffusers' training scripts do)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1, init_lora_weights="gaussian",
                                             target_modules=TEXT_TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("torch_lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    return path


def test_export_samples_the_same_in_diffusers(ours, folder, z_T, tmp_path):
    """Ours -> diffusers: adapters on the UNet's attention and the text encoder, written by
    save_lora_weights (alpha 6 over rank 4), loaded by pipe.load_lora_weights(dir)."""
    adapters = {"unet": random_adapters(ours.params["unet"], UNET_TARGETS, 4, 0),
                "text_encoder": random_adapters(ours.params["text_encoder"], TEXT_TARGETS, 4, 2)}
    file = lora_weights.save_lora_weights(tmp_path, adapters, alpha=6.0)
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    keys = set(load_safetensors(file))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys  # as transformers 4's

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    base = diffusers_latents(pipe, z_T)
    pipe.load_lora_weights(str(tmp_path))
    ref = diffusers_latents(pipe, z_T)
    scaled = {net: jax.tree.map(lambda x: x, tree) for net, tree in adapters.items()}
    for tree in scaled.values():  # alpha / r into B, as a read file has it
        for ab in lora.adapter_items(tree).values():
            ab["B"] = ab["B"] * (6.0 / 4)
    got = our_latents(ours.with_lora(scaled), z_T)
    err = rel_err(got, ref)
    base_err = np.abs(our_latents(ours, z_T) - base).max()  # the folder without the LoRA, for scale
    pipe.fuse_lora()  # diffusers' own merge: how far float32 rounding alone moves these latents
    fused = np.abs(diffusers_latents(pipe, z_T) - ref).max()
    print(f"\nLoRA ours -> diffusers: final latents max abs err {np.abs(got - ref).max():.2e}, rel {err:.2e} "
          f"(diffusers fused vs unfused {fused:.2e}; without the LoRA {base_err:.2e}; |latents| <= "
          f"{np.abs(ref).max():.2f}; the LoRA moved them by {np.abs(ref - base).max():.2f})")
    assert np.abs(ref - base).max() > 0.1  # the LoRA matters
    assert err <= 5e-5 and np.abs(got - ref).max() <= 3 * fused + 1e-5
    np.testing.assert_allclose(our_latents(ours.with_lora(tmp_path), z_T), got, atol=1e-5)  # and back


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_diffusers_file_samples_the_same_in_ours(ours, folder, torch_lora_dir, z_T, scale):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(torch_lora_dir))
    ref = diffusers_latents(pipe, z_T, cross_attention_kwargs={"scale": scale})
    got = our_latents(ours.with_lora(str(torch_lora_dir), scale=scale), z_T)
    err = rel_err(got, ref)
    print(f"\nLoRA diffusers -> ours at scale {scale}: final latents max abs err {np.abs(got - ref).max():.2e}, "
          f"rel {err:.2e}")
    assert err <= 5e-5
    if scale != 1.0:  # diffusers' other way to weigh an adapter gives the same
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[scale])
        np.testing.assert_allclose(diffusers_latents(pipe, z_T), ref, atol=1e-5)
        assert np.abs(got - our_latents(ours.with_lora(str(torch_lora_dir)), z_T)).max() > 0.05


def _peft_file_tensors(path):
    file = path / "pytorch_lora_weights.safetensors"
    state = load_safetensors(file)
    meta = json.loads(lora_weights.safetensors_metadata(file)["lora_adapter_metadata"])
    return state, meta


def test_kohya_and_older_keys_read_as_the_peft_file(ours, torch_lora_dir, tmp_path):
    from safetensors.numpy import save_file

    networks = {"unet": ours.params["unet"], "text_encoder": ours.params["text_encoder"]}
    peft_adapters = lora_weights.load_lora_weights(torch_lora_dir, networks)
    state, meta = _peft_file_tensors(torch_lora_dir)
    assert (meta["unet.r"], meta["unet.lora_alpha"], meta["text_encoder.lora_alpha"]) == (4, 8, 1)

    kohya, legacy = {}, {}
    for key, w in state.items():
        net, rest = key.split(".", 1)
        module, part = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        prefix = "lora_unet_" if net == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = w
        kohya[f"{name}.alpha"] = np.array(meta[f"{net}.lora_alpha"], np.float32)
        old = "lora.down" if part == "lora_A" else "lora.up"
        if net == "text_encoder":
            old = old.replace("lora.", "lora_linear_layer.")
            module = "text_model." + module  # transformers 4's names
        legacy[f"{net}.{module}.{old}.weight"] = w
        legacy[f"{net}.{module}.alpha"] = np.array(meta[f"{net}.lora_alpha"], np.float32)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    for name in ("kohya", "legacy"):
        got = lora_weights.load_lora_weights(tmp_path / f"{name}.safetensors", networks)
        assert jax.tree.structure(got) == jax.tree.structure(peft_adapters), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(peft_adapters)):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # alpha / r folded into B: the UNet's 8 / 4
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
    b_file = state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    node = peft_adapters["unet"]
    for p in path:
        node = node[p]
    np.testing.assert_allclose(node["B"], b_file.T * 2.0)


def test_bad_files_name_the_file_and_key(ours, torch_lora_dir, tmp_path):
    from safetensors.numpy import save_file

    networks = {"unet": ours.params["unet"], "text_encoder": ours.params["text_encoder"]}
    state, _ = _peft_file_tensors(torch_lora_dir)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    cases = {
        "unknown": ({**state, "unet.down_blocks.0.nothing.lora_A.weight": state[key],
                     "unet.down_blocks.0.nothing.lora_B.weight": state[key]},
                    "'down_blocks.0.nothing' is not a linear"),
        "shape": ({**state, key: state[key][:, :-1]}, "do not fit"),
        "half": ({k: v for k, v in state.items() if k != key}, "has no lora_A"),
        "kohya": ({"lora_unet_down_blocks_9_to_q.lora_down.weight": state[key]}, "names no linear layer"),
        "foreign": ({**state, "vae.decoder.lora_A.weight": state[key]}, "neither the UNet"),
    }
    for name, (tensors, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file))
        with pytest.raises(ValueError, match=message) as info:
            lora_weights.load_lora_weights(file, networks)
        assert str(file) in str(info.value), name
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        ours.with_lora(tmp_path)
    with pytest.raises(ValueError, match="matches no layer"):
        lora_weights.target_paths(ours.params["unet"], ["to_z"])
    with pytest.raises(ValueError, match="finite"):
        ours.with_lora(torch_lora_dir, scale=float("nan"))
    # An adapter tree naming a layer the network does not call (e.g. another config's) is refused.
    ab = {"A": np.zeros((32, 2), np.float32), "B": np.zeros((2, 32), np.float32)}
    with pytest.raises(ValueError, match=r"never called: \['text_encoder:encoder/layers_7/self_attn/q_proj'\]"):
        with lora.adapted({"text_encoder": {"encoder": {"layers_7": {"self_attn": {"q_proj": ab}}}}}):
            ours.text_encoder.apply({"params": ours.params["text_encoder"]}, te.tokenize(ours.tokenizer, PROMPTS))


def test_sample_command_merges_the_lora(ours, folder, torch_lora_dir, tmp_path):
    """python -m ldm_jax.sample --pretrained DIR --lora PATH --lora_scale S: the pipeline it samples is
    with_lora's, a sidecar's model regenerates with the same LoRA, and bad flags fail before sampling."""
    from ldm_jax import sample_job

    args = sample_job.SampleArgs(out=str(tmp_path), pretrained=str(folder), lora=str(torch_lora_dir), lora_scale=0.5,
                                 prompt=["a cat"], progress=False)
    pipe = sample_job.load_pipeline(args)
    want = ours.with_lora(torch_lora_dir, scale=0.5)
    for a, b in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(a, b)
    assert pipe.info["lora"] == [{"path": str(torch_lora_dir / "pytorch_lora_weights.safetensors"), "scale": 0.5}]
    assert not np.array_equal(pipe.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
                              ["to_q"]["kernel"], ours.params["unet"]["down_blocks_0"]["attentions_0"]
                              ["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])
    settings = dict(sampler="euler", steps=2, guidance=1.0, guidance_rescale=0.0, eta=0.0, height=16, width=16)
    back = sample_job.args_from_sidecar({"model": {"pretrained": str(folder), **pipe.info}, "prompt": "a cat",
                                         "negative_prompt": None, "seed": 0, "init_image": None, "mask": None,
                                         **settings}, str(tmp_path))
    assert (back.lora, back.lora_scale) == (pipe.info["lora"][0]["path"], 0.5)
    for bad, message in ((dict(lora_scale=2.0, lora=None), "--lora_scale weighs a --lora"),
                         (dict(lora=str(tmp_path / "none.safetensors")), "no LoRA file")):
        with pytest.raises(sample_job.SampleError, match=message):
            sample_job.generate(dataclasses.replace(args, **bad))
