"""CLIPScorer against transformers' CLIPModel at random weights, read from a save_pretrained
folder; the image preprocessing against transformers' CLIP image processor."""
import json

import numpy as np
import pytest

from ldm_jax.evaluation import clip_score as cs
from ldm_jax.models.text_encoder import write_vocab_files
from tests.torch_random import randomize_torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# The real vocabulary (the folder's tokenizer is the CLIP one), everything else tiny.
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)
PROMPTS = ["a photo of a cat", "a red circle on the left", "two blue squares",
           "an astronaut riding a horse on mars, trending on artstation", ""]


def _pil_processor(size=32):
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    for i, part in enumerate([model.text_model, model.vision_model, model.visual_projection,
                              model.text_projection]):
        randomize_torch(part, seed=i)
    model.save_pretrained(folder)  # config.json + model.safetensors
    write_vocab_files(folder)
    _pil_processor().save_pretrained(folder)  # preprocessor_config.json
    return folder, model


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return cs.CLIPScorer.from_pretrained(checkpoint[0], batch_size=4)


@pytest.fixture(scope="module")
def images():
    # Non-square uint8 images, larger than the model's 32 x 32, so they are resized and cropped.
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (5, 10, 14, 3)).repeat(4, axis=1).repeat(4, axis=2)
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)  # [5, 40, 56, 3]


@pytest.fixture(scope="module")
def torch_embeds(checkpoint, images):
    """transformers' normalised image and text embeddings: its processor, tokenizer and model."""
    folder, model = checkpoint
    pixels = _pil_processor()(list(images), return_tensors="pt")["pixel_values"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    return out.image_embeds.numpy(), out.text_embeds.numpy()


def test_image_embeds_parity(scorer, images, torch_embeds):
    ours = scorer.image_embeds(images)  # 5 images in batches of 4: the last batch is padded
    assert ours.shape == (5, 16) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ours, torch_embeds[0], atol=1e-5)


def test_text_embeds_parity(scorer, torch_embeds):
    ours = scorer.text_embeds(PROMPTS)
    assert ours.shape == (5, 16)
    np.testing.assert_allclose(ours, torch_embeds[1], atol=1e-5)


def test_score_is_100_max_cos_0(scorer, images, torch_embeds):
    image_ref, text_ref = torch_embeds
    cos = image_ref @ text_ref.T  # [5 images, 5 prompts]
    # The matched pairs, plus the most and least similar pairs: the clamp at 0 must show.
    neg, pos = np.unravel_index(cos.argmin(), cos.shape), np.unravel_index(cos.argmax(), cos.shape)
    assert cos[neg] < 0 < cos[pos]
    pairs = [(i, i) for i in range(5)] + [neg, pos]
    expected = np.array([100 * max(cos[i, j], 0.0) for i, j in pairs])
    picked_images = images[[i for i, _ in pairs]]
    picked_prompts = [PROMPTS[j] for _, j in pairs]
    scores = scorer.score(picked_images, picked_prompts)
    assert scores.shape == (7,) and scores[5] == 0.0
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    assert scorer.clip_score(picked_images, picked_prompts) == pytest.approx(expected.mean(),
                                                                             abs=1e-3)


def test_preprocessing_matches_transformers():
    rng = np.random.default_rng(1)
    landscape = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    portrait = rng.integers(0, 256, (91, 37, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (50, 33, 1), dtype=np.uint8)
    for size, image in [(32, landscape), (32, portrait), (32, grey), (224, landscape)]:
        ours = cs.ImagePreprocessor(size, (size, size))([image])
        ref = _pil_processor(size)([np.repeat(image, 3, -1) if image.shape[-1] == 1 else image],
                                   return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        assert ours.shape == (1, size, size, 3), image.shape
        np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=str(image.shape))
    # The processor's saved config gives the same preprocessor.
    config = json.loads(_pil_processor(32).to_json_string())
    assert cs.ImagePreprocessor.from_config(config) == cs.ImagePreprocessor(32, (32, 32))
    # OpenAI's own preprocessor_config.json (transformers 4 era) writes sizes as ints.
    legacy = {"crop_size": 224, "size": 224, "resample": 3, "do_center_crop": True,
              "feature_extractor_type": "CLIPFeatureExtractor"}
    assert cs.ImagePreprocessor.from_config(legacy) == cs.ImagePreprocessor()
    with pytest.raises(ValueError, match="do_center_crop=false"):
        cs.ImagePreprocessor.from_config({**legacy, "do_center_crop": False})
    # Already 32 high: no resampling, and the crop starts at column (48 - 32) // 2 = 8.
    square = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(cs.ImagePreprocessor(32, (32, 32)).resize_and_crop(square),
                                  square[:, 8:40])


def test_errors(tmp_path, checkpoint, scorer, images):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match="no_such_clip.*no such folder.*config.json"):
        cs.CLIPScorer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=r"missing .*config\.json"):
        cs.CLIPScorer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((checkpoint[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"missing .*model\.safetensors"):
        cs.CLIPScorer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (tmp_path / "model.safetensors").write_bytes((checkpoint[0] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="config.json.*needs text_config and vision_config"):
        cs.CLIPScorer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="one prompt per image: got 5 images and 2 prompts"):
        scorer.score(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"images\[0\] has dtype float32.*uint8"):
        scorer.score(images.astype(np.float32), PROMPTS)
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(40, 56, 4\)"):
        scorer.image_embeds(np.zeros((1, 40, 56, 4), np.uint8))


def test_reads_pytorch_bin(tmp_path, checkpoint):
    # pytorch_model.bin (older save_pretrained) is read with torch.load(weights_only=True).
    folder, model = checkpoint
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config, state = cs.read_checkpoint(tmp_path)
    _, reference = cs.read_checkpoint(folder)
    assert config["model_type"] == "clip" and set(state) == set(reference)
    for k in reference:
        np.testing.assert_array_equal(state[k], reference[k], err_msg=k)
