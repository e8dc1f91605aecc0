"""AutoencoderKL weight/config conversion: parity with diffusers' ``AutoencoderKL`` at random weights
(posterior mean / log-variance and decoded images), exact round trips, clear errors."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.interop.vae_weights import (vae_config_from_kwargs, vae_kwargs_from_config,  # noqa: E402
                                         vae_params_from_state_dict, vae_state_dict_from_params)
from ldm_jax.models.autoencoder import AutoencoderKL  # noqa: E402
from tests.interop.test_unet_weights import randomize_, state_dict_numpy  # noqa: E402

CONFIG = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
              latent_channels=4, sample_size=16, scaling_factor=0.13025)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CONFIG).eval()
    randomize_(ref, seed=1)
    sd = state_dict_numpy(ref)
    kwargs = vae_kwargs_from_config(dict(ref.config))
    return dict(ref=ref, sd=sd, kwargs=kwargs, params=vae_params_from_state_dict(sd, kwargs))


def _max_err(name, out, expected):
    err, scale = float(np.abs(np.asarray(out) - expected).max()), float(np.abs(expected).max())
    print(f"\nVAE parity [{name}]: max abs err {err:.3g}, max |ref| {scale:.3g}")
    assert err <= 1e-4 * max(1.0, scale)


def test_encode_parity_with_diffusers(case):
    x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    vae = AutoencoderKL(**case["kwargs"])
    post = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(case["params"], x)
    with torch.no_grad():
        dist = case["ref"].encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    assert post.mean.shape == (2, 4, 4, 4)
    _max_err("encode mean", post.mean, dist.mean.permute(0, 2, 3, 1).numpy())
    _max_err("encode logvar", post.logvar, dist.logvar.permute(0, 2, 3, 1).numpy())


def test_decode_parity_with_diffusers(case):
    z = np.random.RandomState(1).randn(2, 4, 4, 4).astype(np.float32)
    vae = AutoencoderKL(**case["kwargs"])
    img = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(case["params"], z)
    with torch.no_grad():
        expected = case["ref"].decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    assert img.shape == (2, 16, 16, 3)
    _max_err("decode", img, expected.permute(0, 2, 3, 1).numpy())


def test_state_dict_round_trip_is_exact(case):
    back = vae_state_dict_from_params(case["params"], case["kwargs"])
    assert set(back) == set(case["sd"])
    for k, v in case["sd"].items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_config_round_trip_builds_same_architecture(case):
    config = vae_config_from_kwargs(case["kwargs"])
    rebuilt = diffusers.AutoencoderKL.from_config(config)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in case["sd"].items()}
    assert vae_kwargs_from_config(dict(rebuilt.config)) == case["kwargs"]
    assert rebuilt.config.scaling_factor == CONFIG["scaling_factor"]


def test_mismatched_state_dict_names_the_keys(case):
    sd = dict(case["sd"])
    sd.pop("encoder.mid_block.attentions.0.to_q.weight")
    sd["encoder.mid_block.attentions.0.query.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError) as e:
        vae_params_from_state_dict(sd, case["kwargs"])
    assert "attentions.0.to_q.weight" in str(e.value) and "attentions.0.query.weight" in str(e.value)


@pytest.mark.parametrize("key,value", [("down_block_types", ("DownBlock2D",) * 3),
                                       ("shift_factor", 0.1159), ("act_fn", "gelu")])
def test_unsupported_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        vae_kwargs_from_config(dict(CONFIG, **{key: value}))
