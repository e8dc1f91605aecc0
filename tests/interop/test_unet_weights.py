"""UNet weight/config conversion: numerical parity with diffusers' ``UNet2DConditionModel`` at random
weights (float32), exact state-dict round trips, config round trips, and clear errors."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.interop.unet_weights import (unet_config_from_kwargs, unet_kwargs_from_config,  # noqa: E402
                                          unet_params_from_state_dict, unet_state_dict_from_params)
from ldm_jax.models.unet import UNet  # noqa: E402

CONFIGS = {
    # SD-1 style: conv projections, cross-attention at the first two levels, none at the last,
    # two resnets per level (several skips per level).
    "sd1": dict(sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8),
    # SD-2 style: linear projections, per-level head counts (diffusers' `attention_head_dim` key),
    # per-level transformer depth, out_channels != in_channels (learned variance).
    "sd2": dict(sample_size=8, in_channels=4, out_channels=8, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2), use_linear_projection=True,
                cross_attention_dim=16, norm_num_groups=16, norm_eps=1e-6),
    # Class-conditional LDM: class embedding, sin/cos order and frequency shift of DDPM.
    "classcond": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                      cross_attention_dim=8, norm_num_groups=8, num_class_embeds=10,
                      flip_sin_to_cos=False, freq_shift=1),
}


def randomize_(module, seed):
    """Every parameter random (norm scales, biases and zero-initialised output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:  # biases, norm scales
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def state_dict_numpy(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    name = request.param
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    randomize_(ref, seed=sorted(CONFIGS).index(name))
    sd = state_dict_numpy(ref)
    kwargs = unet_kwargs_from_config(dict(ref.config))
    params = unet_params_from_state_dict(sd, kwargs)
    return dict(name=name, ref=ref, sd=sd, kwargs=kwargs, params=params)


def test_forward_parity_with_diffusers(case):
    ref, kwargs = case["ref"], case["kwargs"]
    rng = np.random.RandomState(0)
    b, c_in = 2, kwargs["in_channels"]
    x = rng.randn(b, 8, 8, c_in).astype(np.float32)
    ctx = rng.randn(b, 5, kwargs["cross_attention_dim"]).astype(np.float32)
    t = np.array([0.5, 731.0], np.float32)  # fractional timesteps are allowed
    labels = np.array([3, 9], np.int32) if kwargs["num_class_embeds"] else None
    unet = UNet(**kwargs)
    out = jax.jit(lambda p, x, t, c, y: unet.apply({"params": p}, x, t, c, y))(
        case["params"], x, t, ctx, labels)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                       torch.from_numpy(ctx),
                       class_labels=None if labels is None else torch.from_numpy(labels).long()
                       ).sample.permute(0, 2, 3, 1).numpy()
    assert out.shape == expected.shape == (b, 8, 8, kwargs["out_channels"])
    err, scale = float(np.abs(np.asarray(out) - expected).max()), float(np.abs(expected).max())
    print(f"\nUNet parity [{case['name']}]: max abs err {err:.3g}, max |ref| {scale:.3g}")
    assert err <= 1e-4 * max(1.0, scale)


def test_state_dict_round_trip_is_exact(case):
    back = unet_state_dict_from_params(case["params"], case["kwargs"])
    assert set(back) == set(case["sd"])
    for k, v in case["sd"].items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_config_round_trip_builds_same_architecture(case):
    config = unet_config_from_kwargs(case["kwargs"])
    rebuilt = diffusers.UNet2DConditionModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in case["sd"].items()}
    assert unet_kwargs_from_config(dict(rebuilt.config)) == case["kwargs"]
    # The exported state dict loads strictly into the rebuilt diffusers model.
    back = unet_state_dict_from_params(case["params"], case["kwargs"])
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_mismatched_state_dict_names_the_keys(case):
    sd = dict(case["sd"])
    sd.pop("conv_in.bias")
    sd["mid_block.extra.weight"] = np.zeros(3, np.float32)
    sd["conv_out.weight"] = sd["conv_out.weight"][:, :, :1]  # wrong kernel size
    with pytest.raises(ValueError) as e:
        unet_params_from_state_dict(sd, case["kwargs"])
    msg = str(e.value)
    assert "conv_in.bias" in msg and "mid_block.extra.weight" in msg and "conv_out.weight" in msg


@pytest.mark.parametrize("key,value", [("addition_embed_type", "text_time"),
                                       ("only_cross_attention", True),
                                       ("resnet_time_scale_shift", "scale_shift"),
                                       ("some_future_key", 1)])
def test_unsupported_config_names_the_key(key, value):
    config = dict(CONFIGS["sd1"], **{key: value})
    with pytest.raises(ValueError, match=key):
        unet_kwargs_from_config(config)


def test_sd15_config_maps_to_sd15_architecture():
    # The SD 1.5 unet/config.json (only its architectural keys matter here).
    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
              "cross_attention_dim": 768,
              "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
              "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    kwargs = unet_kwargs_from_config(config)
    assert kwargs["num_attention_heads"] == 8 and kwargs["cross_attention_dim"] == 768
    assert unet_kwargs_from_config(unet_config_from_kwargs(kwargs)) == kwargs
