"""CLIPVisionEncoder / CLIPDualEncoder parity with transformers' CLIPModel at random weights,
the weight conversion, and the ViT-B/32 size."""
import jax
import numpy as np
import pytest

from ldm_jax.interop import clip_vision_weights as cvw
from ldm_jax.models.clip_vision import CLIPDualEncoder, CLIPVisionEncoder
from tests.torch_random import randomize_torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, eos_token_id=98, bos_token_id=97,
            pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, hidden_act="gelu")  # gelu: a non-default activation
LOGIT_SCALE = 1.7


def _rel_err(ours, ref):
    ref = np.asarray(ref)
    return float(np.abs(np.asarray(ours) - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.fixture(scope="module")
def torch_clip():
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    # Every weight random (norm scales, biases, class token...), and a non-default temperature.
    for i, part in enumerate([model.text_model, model.vision_model, model.visual_projection,
                              model.text_projection]):
        randomize_torch(part, seed=i)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    return model


@pytest.fixture(scope="module")
def converted(torch_clip):
    kwargs = cvw.clip_kwargs_from_config(torch_clip.config.to_dict())
    state = {k: v.numpy() for k, v in torch_clip.state_dict().items()}
    return kwargs, state, cvw.clip_params_from_state_dict(state, kwargs)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)  # NHWC, "normalised"
    ids = np.array([[97, 5, 7, 9, 98] + [98] * 11, [97, 40, 98] + [98] * 13], np.int32)
    with torch.no_grad():
        pt_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        pt_ids = torch.from_numpy(ids).long()
    return pixels, ids, pt_pixels, pt_ids


def test_kwargs_from_config(converted):
    kwargs = converted[0]
    assert kwargs["vision"] == dict(VISION, num_channels=3, layer_norm_eps=1e-5)
    assert kwargs["text"]["eos_token_id"] == 98 and kwargs["projection_dim"] == 16
    # transformers 4 configs may carry *_config_dict overrides; those win, as in transformers.
    old = {"text_config": TEXT, "vision_config": {**VISION, "patch_size": 4},
           "vision_config_dict": {"patch_size": 8}, "projection_dim": 16}
    assert cvw.clip_kwargs_from_config(old)["vision"]["patch_size"] == 8
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=8"):
        cvw.vision_encoder_kwargs_from_config({**VISION, "image_size": 30})
    with pytest.raises(ValueError, match="only square"):
        cvw.vision_encoder_kwargs_from_config({**VISION, "image_size": [32, 16]})
    with pytest.raises(ValueError, match="hidden_act"):
        cvw.vision_encoder_kwargs_from_config({**VISION, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="clip_vision_model"):  # a single tower's config.json
        cvw.clip_kwargs_from_config({"model_type": "clip_vision_model", **VISION})


@pytest.fixture(scope="module")
def ours(converted, inputs):
    """Our outputs, all from one compiled function: the vision tower on its own (converted from
    the vision_model.* keys of the CLIPModel state dict), both projections and the logits."""
    kwargs, state, params = converted
    pixels, ids = inputs[:2]
    vision_params = cvw.vision_encoder_params_from_state_dict(state, kwargs["vision"])
    tower, model = CLIPVisionEncoder(**kwargs["vision"]), cvw.make_clip(kwargs)

    @jax.jit
    def run(vision_params, params, pixels, ids):
        v = {"params": params}
        hidden, pooled = tower.apply({"params": vision_params}, pixels)
        return dict(hidden=hidden, pooled=pooled, logits=model.apply(v, pixels, ids),
                    image=model.apply(v, pixels, method=CLIPDualEncoder.image_features),
                    text=model.apply(v, ids, method=CLIPDualEncoder.text_features))

    out = run(vision_params, params, pixels, ids)
    return vision_params, {k: np.asarray(x) for k, x in out.items()}


def test_vision_tower_parity(torch_clip, converted, inputs, ours):
    vision_params, out = ours
    assert out["hidden"].shape == (3, 17, 32) and out["pooled"].shape == (3, 32)
    with torch.no_grad():
        ref = torch_clip.vision_model(pixel_values=inputs[2])
    errs = {"last_hidden_state": _rel_err(out["hidden"], ref.last_hidden_state),
            "pooled": _rel_err(out["pooled"], ref.pooler_output)}
    print(f"\nvision tower rel err: {errs}")
    assert max(errs.values()) < 1e-5, errs
    np.testing.assert_array_equal(
        vision_params["embeddings"]["patch_embedding"]["kernel"],
        converted[2]["vision_model"]["embeddings"]["patch_embedding"]["kernel"])


def test_features_and_logits_parity(torch_clip, inputs, ours):
    out = ours[1]
    _, _, pt_pixels, pt_ids = inputs
    with torch.no_grad():
        ref = torch_clip(input_ids=pt_ids, pixel_values=pt_pixels)
        ref_image = torch_clip.get_image_features(pixel_values=pt_pixels).pooler_output
        ref_text = torch_clip.get_text_features(input_ids=pt_ids).pooler_output
    errs = {"image_features": _rel_err(out["image"], ref_image),
            "text_features": _rel_err(out["text"], ref_text),
            "logits_per_image": _rel_err(out["logits"], ref.logits_per_image)}
    print(f"\nCLIP rel err: {errs}")
    assert max(errs.values()) < 1e-5, errs
    assert out["logits"].shape == (3, 2)
    # The temperature really is applied: logits / exp(scale) are cosines, and not all tiny.
    cos = out["logits"] / np.exp(LOGIT_SCALE)
    assert np.abs(cos).max() <= 1 + 1e-6 and np.abs(out["logits"]).max() > 1.0


def test_state_dict_round_trip_and_layouts(converted):
    kwargs, state, params = converted
    back = cvw.clip_state_dict_from_params(params)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    # transformers 5 CLIPVisionModel keys (no prefix), plus an old position_ids buffer.
    vision_sd = {k[len("vision_model."):]: v for k, v in state.items()
                 if k.startswith("vision_model.")}
    vision_params = cvw.vision_encoder_params_from_state_dict(
        {**vision_sd, "embeddings.position_ids": np.arange(17)[None]}, kwargs["vision"])
    assert cvw.vision_encoder_state_dict_from_params(vision_params).keys() == vision_sd.keys()
    np.testing.assert_array_equal(vision_params["embeddings"]["class_embedding"],
                                  vision_sd["embeddings.class_embedding"])
    np.testing.assert_array_equal(  # OIHW -> HWIO
        vision_params["embeddings"]["patch_embedding"]["kernel"],
        vision_sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))


def test_mismatch_errors_name_the_keys(converted):
    kwargs, state, _ = converted
    bad = dict(state)
    del bad["visual_projection.weight"]
    bad["vision_model.embeddings.position_embedding.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError) as e:
        cvw.clip_params_from_state_dict(bad, kwargs)
    msg = str(e.value)
    assert "missing" in msg and "visual_projection.weight" in msg
    assert "vision_model.embeddings.position_embedding.weight: got (5, 32)" in msg


def test_rejects_wrong_image_shape(converted):
    kwargs, state, _ = converted
    module = CLIPVisionEncoder(**kwargs["vision"])
    params = cvw.vision_encoder_params_from_state_dict(state, kwargs["vision"])
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        module.apply({"params": params}, np.zeros((1, 24, 32, 3), np.float32))


def test_vit_b32_param_count():
    # transformers' CLIPVisionModel(CLIPVisionConfig()) (ViT-B/32) has 87,456,000 parameters:
    # conv 3*32*32*768 + class 768 + positions 50*768 + 2 LayerNorms + 12 layers of 7,087,872.
    shapes = cvw.vision_encoder_param_shapes(cvw.vision_encoder_kwargs_from_config({}))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert count == 3 * 32 * 32 * 768 + 768 + 50 * 768 + 2 * 1536 + 12 * 7_087_872 == 87_456_000
