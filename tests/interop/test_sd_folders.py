"""Real Stable Diffusion folder layouts load (tests/sd_folders.py builds them with diffusers):
fp16 / bf16 variants, shards, model_index.json naming a safety checker, SD 2.x configs; the
weights equal those diffusers' own from_pretrained loads; errors name the file or key."""
import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.interop import clip_weights, unet_weights, vae_weights  # noqa: E402
from ldm_jax.interop import diffusers as hf  # noqa: E402
from ldm_jax.models import text_encoder as te  # noqa: E402
from tests import sd_folders  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_folders")
    return {
        "fp16": sd_folders.make_sd_folder(root / "fp16", "sd15", variant="fp16"),
        "fp16_sharded": sd_folders.make_sd_folder(root / "fp16_sharded", "sd15", variant="fp16", shard=True),
        "both": sd_folders.make_sd_folder(root / "both", "sd15", variant=(None, "fp16"), extras=None),
        "sd21": sd_folders.make_sd_folder(root / "sd21", "sd21", shard=True, extras="present"),
        "inpaint_bf16": sd_folders.make_sd_folder(root / "inpaint_bf16", "sd_inpaint", variant="bf16"),
    }


def _state_dicts(c: hf.DiffusersComponents) -> dict:
    """Our loaded params, back as PyTorch-keyed state dicts."""
    return {"unet": unet_weights.unet_state_dict_from_params(c.unet_params, hf.module_kwargs(c.unet)),
            "vae": vae_weights.vae_state_dict_from_params(c.vae_params, hf.module_kwargs(c.vae)),
            "text_encoder": clip_weights.text_encoder_state_dict_from_params(c.text_encoder_params)}


def _assert_same_as(ours: hf.DiffusersComponents, pipe):
    """Every tensor equal to the diffusers pipeline's (as float32), and our params float32."""
    for name, state in _state_dicts(ours).items():
        ref = {k: v.float().numpy() for k, v in getattr(pipe, name).state_dict().items()
               if not k.endswith("position_ids")}
        assert set(state) == set(ref), name
        for k in ref:
            np.testing.assert_array_equal(state[k], ref[k], err_msg=f"{name}: {k}")
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(
        (ours.unet_params, ours.vae_params, ours.text_encoder_params))}
    assert dtypes == {np.dtype(np.float32)}


def _from_pretrained(path, kind="sd15", **kwargs):
    cls = getattr(diffusers, sd_folders._PIPELINE_CLASS[kind])
    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("feature_extractor", None)
    return cls.from_pretrained(str(path), local_files_only=True, **kwargs)


def test_fp16_only_folder_picks_its_variant_and_equals_diffusers_load(folders):
    ours = hf.load_diffusers_dir(folders["fp16"])
    assert ours.variant == "fp16"  # the folder holds only *.fp16.safetensors: picked without asking
    assert ours.weight_files["unet"] == "unet/diffusion_pytorch_model.fp16.safetensors"
    assert ours.ignored == {"safety_checker": "StableDiffusionSafetyChecker",
                            "feature_extractor": "CLIPImageProcessor"}
    ref = _from_pretrained(folders["fp16"], variant="fp16")
    assert ref.unet.conv_in.weight.dtype == torch.float32  # diffusers upcasts too
    _assert_same_as(ours, ref)
    # The factory's torch pipeline for the variant holds the same (fp16-rounded) weights.
    _assert_same_as(ours, sd_folders.sd_pipeline("sd15", variant="fp16"))
    assert ours.scheduler_config == sd_folders.SCHEDULER_CONFIGS["sd15"]
    assert ours.vae.scaling_factor == pytest.approx(0.18215)  # the real config leaves it out


def test_sharded_variant_equals_single_file(folders):
    shards = sorted(p.name for p in (folders["fp16_sharded"] / "unet").glob("*.safetensors"))
    assert len(shards) >= 2 and shards[0] == "diffusion_pytorch_model.fp16-00001-of-%05d.safetensors" % len(shards)
    sharded = hf.load_diffusers_dir(folders["fp16_sharded"], variant="fp16")
    assert sharded.weight_files == {"unet": "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                                    "vae": "vae/diffusion_pytorch_model.fp16.safetensors",
                                    "text_encoder": "text_encoder/model.safetensors.index.fp16.json"}
    single = hf.load_diffusers_dir(folders["fp16"], variant="fp16")
    a, b = (jax.tree_util.tree_leaves_with_path((c.unet_params, c.vae_params, c.text_encoder_params))
            for c in (sharded, single))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_folder_with_two_variants_reads_the_one_asked_for(folders):
    plain = hf.load_diffusers_dir(folders["both"])
    fp16 = hf.load_diffusers_dir(folders["both"], variant="fp16")
    assert (plain.variant, fp16.variant) == (None, "fp16") and plain.ignored == {}
    _assert_same_as(plain, sd_folders.sd_pipeline("sd15"))
    _assert_same_as(fp16, _from_pretrained(folders["both"], variant="fp16"))
    diff = np.abs(plain.unet_params["conv_in"]["kernel"] - fp16.unet_params["conv_in"]["kernel"]).max()
    assert 0 < diff < 1e-2  # the float16 rounding, nothing else


def test_sd21_layout_with_safety_checker_folders(folders):
    ours = hf.load_diffusers_dir(folders["sd21"])
    assert (folders["sd21"] / "safety_checker" / "model.safetensors").is_file()
    assert ours.ignored == {"safety_checker": "StableDiffusionSafetyChecker",
                            "feature_extractor": "CLIPImageProcessor"}
    assert ours.weight_files["unet"] == "unet/diffusion_pytorch_model.safetensors.index.json"
    ref = _from_pretrained(folders["sd21"], safety_checker=None, feature_extractor=None)
    _assert_same_as(ours, ref)
    assert ours.unet.num_attention_heads == (2, 4) and ours.unet.use_linear_projection
    assert ours.schedule["prediction"] == "v" and ours.text_encoder.hidden_act == "gelu"
    prompts = ["a photo of an astronaut", ""]
    ref_ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids = te.tokenize(ours.tokenizer, prompts)
    np.testing.assert_array_equal(ids, ref_ids)
    assert ids[1, -1] == 0  # SD 2.x pads with "!" (id 0), not <|endoftext|>


def test_bf16_inpainting_folder(folders):
    ours = hf.load_diffusers_dir(folders["inpaint_bf16"])
    assert ours.variant == "bf16" and ours.unet.in_channels == 9
    _assert_same_as(ours, _from_pretrained(folders["inpaint_bf16"], "sd_inpaint", variant="bf16"))


def test_other_index_name_and_an_image_encoder_entry(folders, tmp_path):
    # Some Hub folders name a sharded variant's index {stem}.fp16.safetensors.index.json; newer
    # model_index.json files name an image encoder (IP-Adapter), which is not loaded either.
    other = _copy(folders["fp16_sharded"], tmp_path / "other")
    (other / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(
        other / "unet" / "diffusion_pytorch_model.fp16.safetensors.index.json")
    _edit_json(other / "model_index.json",
               lambda d: d.update(image_encoder=["transformers", "CLIPVisionModelWithProjection"]))
    ours = hf.load_diffusers_dir(other)
    assert ours.variant == "fp16"
    assert ours.weight_files["unet"] == "unet/diffusion_pytorch_model.fp16.safetensors.index.json"
    assert ours.ignored["image_encoder"] == "CLIPVisionModelWithProjection"
    ref = hf.load_diffusers_dir(folders["fp16"])
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_leaves_with_path(c.unet_params) for c in (ours, ref))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_pipeline_info_names_variant_and_ignored_components(folders):
    from ldm_jax.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_diffusers_dir(str(folders["fp16_sharded"]))
    assert pipe.info == dict(kind="diffusers", path=str(folders["fp16_sharded"]), variant="fp16",
                             ignored={"safety_checker": "StableDiffusionSafetyChecker",
                                      "feature_extractor": "CLIPImageProcessor"})
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Errors name the file or key


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_shard_is_named(folders, tmp_path):
    bad = _copy(folders["fp16_sharded"], tmp_path / "bad")
    (bad / "text_encoder" / "model.fp16-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder/model\.fp16-00002-of-00002\.safetensors "
                                                r"\(listed in .*model\.safetensors\.index\.fp16\.json\)"):
        hf.load_diffusers_dir(bad)


def test_index_naming_a_missing_tensor_is_named(folders, tmp_path):
    bad = _copy(folders["fp16_sharded"], tmp_path / "bad")
    index = bad / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    _edit_json(index, lambda d: d["weight_map"].update(
        {"conv_in.extra": "diffusion_pytorch_model.fp16-00001-of-00003.safetensors"}))
    with pytest.raises(ValueError, match=r"index\.fp16\.json lists tensor 'conv_in\.extra' in "
                                         r"diffusion_pytorch_model\.fp16-00001-of-00003\.safetensors"):
        hf.load_diffusers_dir(bad)


def test_model_index_errors_name_the_component(folders, tmp_path):
    bad = _copy(folders["fp16"], tmp_path / "bad")
    index = bad / "model_index.json"
    _edit_json(index, lambda d: d.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]))
    with pytest.raises(ValueError, match=r"component 'text_encoder_2' \(CLIPTextModelWithProjection\)"):
        hf.load_diffusers_dir(bad)
    _edit_json(index, lambda d: (d.pop("text_encoder_2"), d.update(tokenizer=["transformers", "T5Tokenizer"])))
    with pytest.raises(ValueError, match=r"tokenizer is a T5Tokenizer"):
        hf.load_diffusers_dir(bad)
    _edit_json(index, lambda d: d.update(tokenizer=["transformers", "CLIPTokenizer"],
                                         unet=["diffusers", "UNet2DModel"]))
    with pytest.raises(ValueError, match=r"unet is a UNet2DModel; supported: UNet2DConditionModel"):
        hf.load_diffusers_dir(bad)


def test_variant_errors(folders, tmp_path):
    # Asking for a variant the folder lacks, where a component has no plain files either.
    with pytest.raises(FileNotFoundError, match=r"unet holds the weights variants fp16 but no variant 'bf16'"):
        hf.load_diffusers_dir(folders["fp16"], variant="bf16")
    # Two variants and no plain files: which one is for the user to say.
    bad = _copy(folders["fp16"], tmp_path / "bad")
    shutil.copy(bad / "vae" / "diffusion_pytorch_model.fp16.safetensors",
                bad / "vae" / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(FileNotFoundError, match=r"unet, vae, text_encoder hold no plain \*\.safetensors "
                                                r"weights, and the folder has the variants ema, fp16; pass variant="):
        hf.load_diffusers_dir(bad)
    assert hf.load_diffusers_dir(bad, variant="fp16").variant == "fp16"


def test_the_factory_is_deterministic(folders, tmp_path):
    sd_folders._built.cache_clear()  # rebuild the torch modules from scratch
    again = sd_folders.make_sd_folder(tmp_path / "again", "sd15", variant="fp16")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(folders["fp16"]) for p in folders["fp16"].rglob("*") if p.is_file())
    for f in files:
        assert (again / f).read_bytes() == (folders["fp16"] / f).read_bytes(), f
