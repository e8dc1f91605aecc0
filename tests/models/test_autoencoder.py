"""Autoencoders: SD VAE parameter count, the Gaussian posterior's formulas, the vector quantiser
(nearest code, straight-through gradient, losses, usage statistics), the PatchGAN discriminator.
(Numerical parity with diffusers lives in tests/interop/test_vae_weights.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.autoencoder import (AutoencoderKL, DiagonalGaussian, PatchDiscriminator,
                                        VectorQuantizer, VQAutoencoder)
from tests.models.test_unet import random_params


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_sd_vae_parameter_count():
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4)
    shapes = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert count(shapes["params"]) == 83_653_863


def test_diagonal_gaussian_formulas():
    r = np.random.RandomState(0)
    moments = r.randn(2, 3, 3, 8).astype(np.float32)
    moments[0, 0, 0, 4] = 50.0  # log-variance beyond the clip
    post = DiagonalGaussian.from_moments(jnp.asarray(moments))
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30, 20)
    np.testing.assert_array_equal(post.mean, mean)
    assert float(post.logvar[0, 0, 0, 0]) == 20.0
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), kl, rtol=1e-5)
    # The standard normal has zero KL; a sample is mean + std * eps.
    assert float(DiagonalGaussian(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4))).kl()[0]) == 0
    rng = jax.random.PRNGKey(3)
    eps = jax.random.normal(rng, mean.shape)
    np.testing.assert_allclose(post.sample(rng), mean + np.exp(0.5 * logvar) * eps, rtol=1e-5,
                               atol=1e-6)


def test_autoencoder_call_without_sampling_is_decode_of_mean():
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    params = random_params(vae, x, sample_posterior=False)

    @jax.jit
    def run(params, x, rng):
        recon, post = vae.apply({"params": params}, x, sample_posterior=False)
        decoded_mean = vae.apply({"params": params}, post.mean, method="decode")
        # Sampling draws from the "sample" rng stream.
        sampled, _ = vae.apply({"params": params}, x, rngs={"sample": rng})
        return recon, post, decoded_mean, sampled

    recon, post, decoded_mean, sampled = run(params, x, jax.random.PRNGKey(1))
    assert recon.shape == x.shape and post.mean.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(recon, decoded_mean, atol=1e-6)
    assert not np.allclose(sampled, recon, atol=1e-4)


@pytest.fixture(scope="module")
def vq():
    q = VectorQuantizer(num_codes=16, embed_dim=4, beta=0.25)
    z = jnp.asarray(np.random.RandomState(0).randn(2, 5, 5, 4) * 0.1, jnp.float32)
    params = q.init(jax.random.PRNGKey(0), z)["params"]
    return q, params, z


def test_quantizer_picks_the_nearest_code(vq):
    q, params, z = vq
    z_q, aux = q.apply({"params": params}, z)
    codebook, flat = np.asarray(params["embedding"]), np.asarray(z).reshape(-1, 4)
    idx = np.argmin(((flat[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), idx)
    np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), codebook[idx], atol=1e-6)
    # Losses: both terms equal mean ||z - e||^2 in value; loss = codebook + beta * commitment.
    mse = np.mean((flat - codebook[idx]) ** 2)
    np.testing.assert_allclose([aux["codebook_loss"], aux["commitment_loss"]], [mse, mse], rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], 1.25 * mse, rtol=1e-5)
    # Usage statistics from the code histogram.
    p = np.bincount(idx, minlength=16) / idx.size
    nz = p[p > 0]
    np.testing.assert_allclose(aux["perplexity"], np.exp(-np.sum(nz * np.log(nz))), rtol=1e-5)
    np.testing.assert_allclose(aux["usage"], np.mean(p > 0))


def test_quantizer_gradients(vq):
    q, params, z = vq
    w = jnp.asarray(np.random.RandomState(1).randn(*z.shape), jnp.float32)
    # Straight-through: d(sum(z_q * w))/dz = w exactly.
    g = jax.grad(lambda z: jnp.sum(q.apply({"params": params}, z)[0] * w))(z)
    np.testing.assert_allclose(g, w, atol=1e-6)
    # The loss pulls the encoder only through beta * commitment, the codebook only through the
    # codebook term: d loss / dz = beta * 2 (z - e) / N.
    z_q, _ = q.apply({"params": params}, z)
    g_loss = jax.grad(lambda z: q.apply({"params": params}, z)[1]["loss"])(z)
    np.testing.assert_allclose(g_loss, 0.25 * 2 * (z - z_q) / z.size, atol=1e-7)
    g_cb = jax.grad(lambda p: q.apply({"params": p}, z)[1]["codebook_loss"])(params)["embedding"]
    assert float(jnp.abs(g_cb).sum()) > 0
    g_z_cb = jax.grad(lambda z: q.apply({"params": params}, z)[1]["codebook_loss"])(z)
    assert float(jnp.abs(g_z_cb).max()) == 0.0


def test_vq_autoencoder_smoke_decode_of_encode_is_reconstruction():
    vq = VQAutoencoder(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3,
                       num_codes=32, norm_num_groups=4)
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 8, 8, 3)), jnp.float32)
    params = random_params(vq, x)

    @jax.jit
    def run(params, x):
        recon, aux = vq.apply({"params": params}, x)
        h = vq.apply({"params": params}, x, method="encode")
        return recon, aux, h, vq.apply({"params": params}, h, method="decode")

    recon, aux, h, decoded = run(params, x)
    assert recon.shape == x.shape and h.shape == (1, 4, 4, 3) and aux["indices"].shape == (1, 4, 4)
    np.testing.assert_allclose(decoded, recon, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patch_discriminator_smoke_output_shape(n_layers):
    d = PatchDiscriminator(base_channels=8, n_layers=n_layers)
    x = jnp.zeros((2, 64, 64, 3))
    out = jax.eval_shape(lambda: d.init_with_output(jax.random.PRNGKey(0), x)[0])
    assert out.shape == (2, 64 // 2 ** n_layers - 2, 64 // 2 ** n_layers - 2, 1)


@pytest.mark.parametrize("n_layers,field", [(1, 16), (3, 70)])
def test_patch_discriminator_receptive_field(n_layers, field):
    # Each logit depends on exactly a field x field input patch (70x70 for the pix2pix default).
    d = PatchDiscriminator(base_channels=8, n_layers=n_layers)
    x = jnp.asarray(np.random.RandomState(0).randn(1, 96, 96, 3), jnp.float32)
    variables = jax.jit(d.init)(jax.random.PRNGKey(0), x)
    i = (96 // 2 ** n_layers - 2) // 2
    g = jax.jit(jax.grad(lambda x: d.apply(variables, x)[0, i, i, 0]))(x)
    rows = np.nonzero(np.abs(np.asarray(g[0])).sum(axis=(1, 2)))[0]
    cols = np.nonzero(np.abs(np.asarray(g[0])).sum(axis=(0, 2)))[0]
    assert rows.max() - rows.min() + 1 == field and cols.max() - cols.min() + 1 == field
    # Train mode uses batch statistics and updates the running averages.
    _, new = jax.jit(lambda v, x: d.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert not np.allclose(jax.tree.leaves(new)[0], jax.tree.leaves(variables["batch_stats"])[0])
