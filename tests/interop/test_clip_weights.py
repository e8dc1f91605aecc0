"""transformers CLIPTextModel state dicts / configs <-> CLIPTextEncoder params / kwargs."""
import numpy as np
import pytest

from ldm_jax.interop import clip_weights as cw

KWARGS = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
              layer_norm_eps=1e-5, eos_token_id=98)


def _random_state_dict(seed=0):
    """A state dict with every key and shape of transformers' CLIPTextModel for KWARGS."""
    rng = np.random.default_rng(seed)
    d, f, v, p = 32, 64, 99, 16
    sd = {"embeddings.token_embedding.weight": (v, d), "embeddings.position_embedding.weight": (p, d),
          "final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,)}
    for i in range(2):
        pre = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[pre + f"self_attn.{name}.weight"] = (d, d)
            sd[pre + f"self_attn.{name}.bias"] = (d,)
        sd.update({pre + "mlp.fc1.weight": (f, d), pre + "mlp.fc1.bias": (f,),
                   pre + "mlp.fc2.weight": (d, f), pre + "mlp.fc2.bias": (d,)})
        for ln in ("layer_norm1", "layer_norm2"):
            sd.update({pre + f"{ln}.weight": (d,), pre + f"{ln}.bias": (d,)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in sd.items()}


def test_state_dict_round_trip_is_exact():
    sd = _random_state_dict()
    params = cw.text_encoder_params_from_state_dict(sd, KWARGS)
    q = params["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, sd["encoder.layers.1.self_attn.q_proj.weight"].T)
    back = cw.text_encoder_state_dict_from_params(params, KWARGS)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_accepts_transformers4_prefix_and_position_ids():
    sd = {"text_model." + k: v for k, v in _random_state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(16)[None]
    params = cw.text_encoder_params_from_state_dict(sd, KWARGS)
    np.testing.assert_array_equal(params["final_layer_norm"]["scale"],
                                  sd["text_model.final_layer_norm.weight"])


def test_mismatch_errors_name_the_keys():
    sd = _random_state_dict()
    del sd["encoder.layers.0.mlp.fc1.bias"]
    sd["encoder.layers.1.mlp.fc2.weight"] = np.zeros((32, 63), np.float32)
    sd["text_projection.weight"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError) as e:
        cw.text_encoder_params_from_state_dict(sd, KWARGS)
    msg = str(e.value)
    assert "encoder.layers.0.mlp.fc1.bias" in msg and "missing" in msg
    assert "text_projection.weight" in msg and "unexpected" in msg
    assert "encoder.layers.1.mlp.fc2.weight: got (32, 63), expected shape (32, 64)" in msg


def test_config_round_trip_and_rejections():
    config = cw.text_encoder_config_from_kwargs(KWARGS)
    assert config["architectures"] == ["CLIPTextModel"] and config["hidden_act"] == "gelu"
    assert cw.text_encoder_kwargs_from_config(config) == KWARGS
    # SD 1.x's text_encoder/config.json (transformers 4 era) maps onto the ViT-L/14 defaults.
    sd15 = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
            "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
            "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
            "vocab_size": 49408}
    kw = cw.text_encoder_kwargs_from_config(sd15)
    assert kw["eos_token_id"] == 2 and kw["hidden_size"] == 768 and kw["num_hidden_layers"] == 12
    with pytest.raises(ValueError, match="hidden_act"):
        cw.text_encoder_kwargs_from_config({**config, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        cw.text_encoder_kwargs_from_config({**config, "num_attention_heads": 5})
