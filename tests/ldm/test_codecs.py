"""The autoencoder adapters of ldm_jax.ldm: what the diffusion model sees of a KL, VQ or identity
autoencoder, and the latent table's draw equal to encoding the images."""
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.ldm.codecs import IdentityCodec, KLCodec, VQCodec, make_codec, to_uint8
from ldm_jax.models.autoencoder import AutoencoderKL, IdentityAutoencoder, VQAutoencoder

KL = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                   mid_block_add_attention=False)


def test_the_module_picks_the_adapter():
    assert isinstance(make_codec(KL), KLCodec)
    assert isinstance(make_codec(VQAutoencoder(block_out_channels=(8,), norm_num_groups=8)), VQCodec)
    identity = make_codec(IdentityAutoencoder())
    assert isinstance(identity, IdentityCodec) and identity.is_identity and identity.clip_x0 == 1.0
    assert make_codec(KL).clip_x0 is None and make_codec(KL).latent_size(32) == (16, 16, 4)
    assert identity.latent_size(16, 8) == (16, 8, 3)


def test_a_draw_from_the_stored_moments_is_the_draw_from_the_images():
    codec = make_codec(KL)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    params = KL.init({"params": jax.random.PRNGKey(1), "sample": jax.random.PRNGKey(2)}, images)["params"]
    moments = codec.moments(params, images)
    assert moments.shape == (2, 8, 8, 8) and codec.moments_channels == 8
    rng = jax.random.PRNGKey(3)
    np.testing.assert_allclose(codec.sample_moments(moments, rng), codec.encode_sample(params, images, rng),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(codec.encode_mode(params, images), moments[..., :4])


def test_identity_is_the_pixels_both_ways():
    codec = make_codec(IdentityAutoencoder())
    x = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(codec.encode_sample({}, x, jax.random.PRNGKey(0)), x)
    np.testing.assert_array_equal(codec.decode({}, x), x)


def test_to_uint8_rounds_and_clips_on_host_and_device():
    x = np.asarray([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
    expected = [0, 0, 128, 191, 255, 255]  # round((x + 1) * 127.5), half to even: 127.5 -> 128
    np.testing.assert_array_equal(to_uint8(x), expected)
    np.testing.assert_array_equal(np.asarray(to_uint8(jnp.asarray(x))), expected)
    assert to_uint8(x).dtype == np.uint8
