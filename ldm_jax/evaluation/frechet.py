"""The Fréchet distance between two Gaussians, the statistic behind FID (Heusel et al. 2017, eq. 6):

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

Computed in float64 numpy on the host (the covariances are at most 2048 x 2048). The trace of
the matrix square root is taken without forming (S1 S2)^(1/2): with A = S1^(1/2) (symmetric),
S1 S2 is similar to A S2 A, which is symmetric positive semi-definite, so
Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)). Two symmetric eigendecompositions are stable
for the near-singular covariances of small sample sets (fewer samples than feature dimensions),
where the general `scipy.linalg.sqrtm` of the non-symmetric product returns complex noise.
"""
from __future__ import annotations

import numpy as np


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] in float64; the covariance is unbiased
    (ddof=1), as pytorch-fid's `np.cov(rowvar=False)`."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D] for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (round-off negatives clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    a = _psd_sqrt(np.asarray(sigma1, np.float64))
    w = np.linalg.eigvalsh(a @ np.asarray(sigma2, np.float64) @ a)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (what "FID" reports)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances {sigma1.shape} / {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or infinity (non-finite features?)")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(d, 0.0))  # round-off can leave -1e-12 for identical statistics


def frechet_distance_of_features(features1, features2) -> float:
    """frechet_distance of the Gaussians fitted to two feature sets [N1, D], [N2, D]."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))
