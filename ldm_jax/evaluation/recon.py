"""Autoencoder reconstruction metrics: PSNR and SSIM on held-out images, the scaled latents' std,
and codebook usage for a VQ model.

`psnr` and `ssim` are per-image, jittable JAX functions of two image batches [..., H, W, C].
`ssim` is Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity", eq. 13) with an 11x11 Gaussian window (sigma 1.5, weights normalised to sum 1),
K1 = 0.01, K2 = 0.03, local statistics filtered over the 'valid' region only, and the SSIM map
averaged over positions and channels: what scikit-image's `structural_similarity(a, b,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)`
computes (its Gaussian filter runs over the padded image, but it then crops the border the
window overhangs, leaving exactly the valid region).

`reconstruction_metrics` runs the autoencoder as the LDM uses it: encode, the posterior's mode
(KL) or the continuous pre-quantisation latents (VQ), decode (a VQ model quantises there), then
rounds the reconstruction to uint8 as a saved image would be, and compares it with the input.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.autoencoder import VQAutoencoder

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a, b, name: str):
    if a.shape != b.shape:
        raise ValueError(f"{name}: the two image batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"{name}: expected images [..., H, W, C], got shape {a.shape}")


def psnr(a, b, data_range: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE), MSE over the last
    three axes [H, W, C]: [..., H, W, C] x 2 -> [...] (dB).

    Identical images have MSE 0 and PSNR +inf (as scikit-image's `peak_signal_noise_ratio`).
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    _check_pair(a, b, "psnr")
    mse = jnp.mean((a - b) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D Gaussian weights [size] (centred, summing to 1); the 2-D window is their outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def _filter_valid(x: jax.Array, w: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of x [..., H, W, C] with the window w ⊗ w -> [..., H-k+1, W-k+1, C]."""
    k = len(w)
    h, wd = x.shape[-3] - k + 1, x.shape[-2] - k + 1
    x = sum(float(w[i]) * x[..., i:i + h, :, :] for i in range(k))
    return sum(float(w[i]) * x[..., :, i:i + wd, :] for i in range(k))


def ssim(a, b, data_range: float = 255.0) -> jax.Array:
    """Structural similarity per image (Wang et al. 2004, eq. 13; see the module docstring):
    [..., H, W, C] x 2 -> [...], 1 for identical images. H and W must be at least 11.

    SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range, the moments Gaussian-weighted local ones
    (population, not sample, covariances).
    """
    # Work in units of data_range: the same SSIM, with O(1) numbers for float32's E[x^2] - mu^2.
    a = jnp.asarray(a, jnp.float32) / data_range
    b = jnp.asarray(b, jnp.float32) / data_range
    _check_pair(a, b, "ssim")
    if min(a.shape[-3:-1]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} (the Gaussian "
                         f"window), got {a.shape[-3]}x{a.shape[-2]}")
    w = gaussian_window()
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a ** 2
    var_b = _filter_valid(b * b, w) - mu_b ** 2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(ssim_map, axis=(-3, -2, -1))


def _latents(module: nn.Module, params, images: jax.Array) -> jax.Array:
    """Unscaled latents of uint8 images: the posterior's mode (KL, identity) or the continuous
    pre-quantisation latents (VQ)."""
    latents = module.apply({"params": params}, images.astype(jnp.float32) / 127.5 - 1.0, method="encode")
    return latents.mode() if hasattr(latents, "mode") else latents


@functools.partial(jax.jit, static_argnums=0)
def _evaluate_batch(module: nn.Module, params, images: jax.Array) -> dict[str, jax.Array]:
    """Per-image metrics of one batch of uint8 images [B, S, S, 3] (see `reconstruction_metrics`)."""
    variables = {"params": params}
    z = _latents(module, params, images)
    recon = module.apply(variables, z, method="decode")
    recon = jnp.clip(jnp.round((recon + 1.0) * 127.5), 0.0, 255.0)  # as the saved uint8 image
    out = dict(mse=jnp.mean((recon - images.astype(jnp.float32)) ** 2, axis=(1, 2, 3)),
               ssim=ssim(images, recon),
               z_mean=jnp.mean(z, axis=(1, 2, 3)), z_var=jnp.var(z, axis=(1, 2, 3)))
    if isinstance(module, VQAutoencoder):  # the module's type, fixed before tracing
        _, aux = module.apply(variables, z, method=lambda m, z: m.quantize(z))
        out["codes"] = aux["indices"]
    return out


def _check_inputs(images: np.ndarray, scale_factor: float, batch_size: int):
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"reconstruction_metrics: images must be [N >= 1, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"reconstruction_metrics: images must be uint8 (0..255), got dtype {images.dtype}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"reconstruction_metrics: batch_size must be a positive integer, got {batch_size!r}")
    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"reconstruction_metrics: scale_factor must be positive and finite, got {scale_factor!r}")


def reconstruction_metrics(autoencoder_module: nn.Module, params, images, *, scale_factor: float,
                           batch_size: int) -> dict:
    """How well `autoencoder_module` reconstructs held-out images [N, S, S, 3] uint8.

    `params` is the inner parameter dict (`{"params": params}` is applied). The images run in
    batches of `batch_size` (the last one zero-padded), so one compiled program serves them all.
    Returns floats (and small lists):

    - psnr, psnr_std: mean and std over images of the per-image PSNR (dB, `psnr`). An image
      reconstructed exactly (PSNR +inf) counts at the PSNR of the smallest error uint8 can show,
      one level in one value, 10 log10(255^2 H W C), so the mean stays finite; how many did is
      exact_fraction.
    - ssim, ssim_std: mean and std over images of the per-image SSIM (`ssim`).
    - latent_mean, latent_std: over all elements of scale_factor * z, z the posterior mode (KL) or
      the continuous pre-quantisation latents (VQ): what the diffusion model sees, whose std
      should be about 1 (LDM's `scale_by_std`). Population std. latent_shape: [h, w, c].
    - VQ only: num_codes, codebook_usage (the fraction of codes that quantise at least one
      latent vector, over all images) and perplexity (exp of the entropy of the code
      histogram; num_codes at uniform use).
    """
    images = np.asarray(images)
    _check_inputs(images, scale_factor, batch_size)
    n = len(images)
    parts = []
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
        out = jax.device_get(_evaluate_batch(autoencoder_module, params, jnp.asarray(chunk)))
        parts.append({k: np.asarray(v)[:batch_size - pad] for k, v in out.items()})
    per_image = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    mse = per_image["mse"].astype(np.float64)
    exact = mse == 0
    min_mse = 1.0 / np.prod(images.shape[1:])  # one value off by one level
    image_psnr = 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, min_mse))
    image_ssim = per_image["ssim"].astype(np.float64)
    # All images have the same number of latent elements, so the mean of the per-image means and
    # variances plus the variance of the means is the variance over all elements.
    z_mean, z_var = per_image["z_mean"].astype(np.float64), per_image["z_var"].astype(np.float64)
    latent_var = scale_factor ** 2 * (z_var.mean() + z_mean.var())
    latent_shape = jax.eval_shape(functools.partial(_latents, autoencoder_module), params, images[:1]).shape[1:]
    result = dict(psnr=float(image_psnr.mean()), psnr_std=float(image_psnr.std()),
                  exact_fraction=float(exact.mean()),
                  ssim=float(image_ssim.mean()), ssim_std=float(image_ssim.std()),
                  latent_mean=float(scale_factor * z_mean.mean()), latent_std=float(np.sqrt(latent_var)),
                  latent_shape=[int(d) for d in latent_shape])
    if "codes" in per_image:
        k = autoencoder_module.num_codes
        counts = np.bincount(per_image["codes"].reshape(-1), minlength=k)
        p = counts / counts.sum()
        entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
        result.update(num_codes=int(k), codebook_usage=float(np.mean(counts > 0)),
                      perplexity=float(np.exp(entropy)))
    return result
