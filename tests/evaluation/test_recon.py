import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import convolve2d

from ldm_jax.evaluation import recon
from ldm_jax.models.autoencoder import AutoencoderKL, VQAutoencoder
from ldm_jax.training.autoencoder_stage import make_autoencoder
from tests.models.test_unet import random_params

psnr = jax.jit(recon.psnr, static_argnames="data_range")
ssim = jax.jit(recon.ssim, static_argnames="data_range")
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)


def ssim_reference(a, b, data_range=255.0):
    """Wang et al. 2004, eq. 13, from its definitions in float64: per channel, Gaussian-weighted
    local means, variances and covariance (11x11 window, sigma 1.5, 'valid' region), the SSIM map
    averaged over positions and channels."""
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        filt = lambda v: convolve2d(v, window, mode="valid")  # the window is symmetric: no flip to undo
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
        maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


def smooth_images(rng, n, size=24):
    """Images with structure at several scales (SSIM on pure noise tests little)."""
    coarse = rng.uniform(30, 220, (n, size // 4, size // 4, 3))
    img = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + rng.normal(0, 10, (n, size, size, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def test_psnr_closed_form():
    rng = np.random.default_rng(0)
    a = rng.integers(20, 236, (3, 16, 16, 3)).astype(np.uint8)
    step = np.array([1, 4, 15])[:, None, None, None]
    sign = rng.choice([-1, 1], a.shape)
    b = (a + sign * step).astype(np.uint8)  # every value off by exactly step: MSE = step^2
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(255.0 ** 2 / np.array([1, 16, 225])), rtol=1e-6)
    # Unit range floats: the same numbers.
    np.testing.assert_allclose(psnr(a / 255.0, b / 255.0, data_range=1.0), psnr(a, b), rtol=1e-5)


def test_psnr_of_identical_images_is_inf():
    a = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    assert np.all(np.isposinf(psnr(a, a)))


def test_ssim_of_an_image_with_itself_is_one():
    a = smooth_images(np.random.default_rng(0), 3)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)


def test_ssim_matches_the_definition():
    rng = np.random.default_rng(1)
    a = smooth_images(rng, 4, size=20)
    b = np.stack([
        smooth_images(rng, 1, size=20)[0],  # unrelated
        np.clip(a[1] + rng.normal(0, 20, a[1].shape), 0, 255).astype(np.uint8),  # noisy
        np.clip(a[2].astype(int) + 40, 0, 255).astype(np.uint8),  # brighter
        (a[3] // 2).astype(np.uint8),  # lower contrast
    ])
    got = np.asarray(ssim(a, b))
    want = np.array([ssim_reference(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, want, atol=2e-5)
    # Rectangular images, another data range.
    a2, b2 = a[:, :, :13] / 255.0, b[:, :, :13] / 255.0
    np.testing.assert_allclose(ssim(a2, b2, data_range=1.0), [ssim_reference(x, y, 1.0) for x, y in zip(a2, b2)],
                               atol=2e-5)


def test_ssim_of_a_shift_and_of_noise_lies_in_0_1_and_falls_with_the_noise():
    rng = np.random.default_rng(2)
    a = smooth_images(rng, 1)
    shifted = a + np.uint8(30)
    assert 0.0 < float(ssim(a, shifted)[0]) < 1.0
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    scores = [float(ssim(a, x)[0]) for x in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="at least 11x11"):
        recon.ssim(np.zeros((1, 10, 16, 3)), np.zeros((1, 10, 16, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        recon.psnr(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 1)))


# ---------------------------------------------------------------------------------------------
# reconstruction_metrics against a direct computation on all images at once


@pytest.fixture(scope="module")
def images():
    return smooth_images(np.random.default_rng(3), 5, size=16)


def direct_metrics(images, recon_float, z, scale_factor):
    out = np.clip(np.round((np.asarray(recon_float, np.float64) + 1) * 127.5), 0, 255)
    mse = np.mean((out - images) ** 2, axis=(1, 2, 3))
    image_psnr = 10 * np.log10(255.0 ** 2 / mse)
    image_ssim = np.array([ssim_reference(x, y) for x, y in zip(images, out)])
    scaled = scale_factor * np.asarray(z, np.float64)
    return dict(psnr=image_psnr.mean(), psnr_std=image_psnr.std(), ssim=image_ssim.mean(),
                ssim_std=image_ssim.std(), latent_mean=scaled.mean(), latent_std=scaled.std())


def check_against(got, want):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_reconstruction_metrics_kl(images):
    vae = AutoencoderKL(**TINY)
    x = images.astype(np.float32) / 127.5 - 1
    params = random_params(vae, jnp.asarray(x[:1]), sample_posterior=False)
    recon_float, posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, sample_posterior=False))(params, x)
    got = recon.reconstruction_metrics(vae, params, images, scale_factor=0.5, batch_size=2)  # 2 + 2 + 1 padded
    check_against(got, direct_metrics(images, recon_float, posterior.mean, 0.5))
    assert got["exact_fraction"] == 0.0 and got["latent_shape"] == [8, 8, 4]
    assert "codebook_usage" not in got


def test_reconstruction_metrics_vq(images):
    vq = VQAutoencoder(**TINY, num_codes=16)
    x = images.astype(np.float32) / 127.5 - 1
    params = random_params(vq, jnp.asarray(x[:1]))

    @jax.jit
    def run(p, x):
        recon_float, aux = vq.apply({"params": p}, x)
        return recon_float, aux["indices"], vq.apply({"params": p}, x, method="encode")

    recon_float, codes, z = run(params, x)
    got = recon.reconstruction_metrics(vq, params, images, scale_factor=2.0, batch_size=3)
    check_against(got, direct_metrics(images, recon_float, z, 2.0))
    counts = np.bincount(np.asarray(codes).ravel(), minlength=16)
    p = counts / counts.sum()
    assert got["num_codes"] == 16
    assert got["codebook_usage"] == pytest.approx(np.mean(counts > 0))
    assert got["perplexity"] == pytest.approx(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    assert 1.0 <= got["perplexity"] <= 16 * got["codebook_usage"] + 1e-6


def test_reconstruction_metrics_identity_autoencoder(images):
    ae = make_autoencoder({"kind": "identity"}, 16)
    got = recon.reconstruction_metrics(ae, {}, images, scale_factor=1.0, batch_size=4)
    # Exact reconstructions count at the PSNR of one value off by one level.
    assert got["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 * 16 * 16 * 3)) and got["psnr_std"] == 0.0
    assert got["exact_fraction"] == 1.0 and got["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert got["latent_std"] == pytest.approx(np.std(images / 127.5 - 1.0), rel=1e-5)


def test_reconstruction_metrics_rejects_bad_arguments(images):
    ae = make_autoencoder({"kind": "identity"}, 16)
    with pytest.raises(ValueError, match="images must be uint8"):
        recon.reconstruction_metrics(ae, {}, images.astype(np.float32), scale_factor=1.0, batch_size=2)
    with pytest.raises(ValueError, match=r"images must be \[N >= 1, H, W, 3\]"):
        recon.reconstruction_metrics(ae, {}, images[..., 0], scale_factor=1.0, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        recon.reconstruction_metrics(ae, {}, images, scale_factor=1.0, batch_size=0)
    with pytest.raises(ValueError, match="scale_factor must be positive and finite, got -1"):
        recon.reconstruction_metrics(ae, {}, images, scale_factor=-1.0, batch_size=2)
