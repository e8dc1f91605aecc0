"""The Fréchet distance behind FID: closed forms, identities and near-singular covariances."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from ldm_jax.evaluation import frechet


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid 0.3.0 ``calculate_frechet_distance`` (Apache-2.0), the de facto reference:
    the general ``scipy.linalg.sqrtm`` of S1 S2, retried with ``eps`` on the diagonals when not
    finite, then the real part. (``disp=False`` dropped: deprecated in SciPy 1.17.)"""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def exact_distance_of_features(f1, f2):
    """An independent exact value for small sample sets: with centred features A [N1, D],
    B [N2, D], S1 = A^T A / (N1 - 1) and S2 = B^T B / (N2 - 1), the non-zero eigenvalues of S1 S2
    are the squared singular values of A B^T / sqrt((N1 - 1)(N2 - 1)), so Tr((S1 S2)^(1/2)) is
    that [N1, N2] matrix's nuclear norm: no D x D square root at all."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    scale = np.sqrt((len(f1) - 1) * (len(f2) - 1))
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale
    diff = f1.mean(0) - f2.mean(0)
    return diff @ diff + (a * a).sum() / (len(f1) - 1) + (b * b).sum() / (len(f2) - 1) - 2 * tr_sqrt


def test_diagonal_gaussians_closed_form():
    # Diagonal covariances commute: d = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 3.0, 7), rng.uniform(0.1, 3.0, 7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_rotated_gaussians_closed_form():
    # Rotating both Gaussians by the same orthogonal Q leaves the distance unchanged; the
    # rotated covariances are dense, so this exercises the square roots off the diagonal.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_and_scalar_inputs():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
    assert frechet.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0, rel=1e-12)


@pytest.mark.parametrize("n, d", [(200, 8), (10, 64)])
def test_same_set_is_zero(n, d):
    features = np.random.default_rng(2).normal(size=(n, d)) * 5 + 3
    assert abs(frechet.frechet_distance_of_features(features, features)) < 1e-6


def test_symmetric():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(40, 16)), rng.gamma(2.0, size=(30, 16))
    d12 = frechet.frechet_distance_of_features(f1, f2)
    assert d12 > 1.0
    assert frechet.frechet_distance_of_features(f2, f1) == pytest.approx(d12, rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_near_singular_covariances(seed):
    # 10 samples in 64 dimensions: both covariances have rank 9 and S1 S2 is a non-symmetric
    # product with 55 zero eigenvalues, where a general square root returns complex round-off.
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=(10, 64))
    f2 = rng.normal(size=(10, 64)) * 1.3 + 0.2
    got = frechet.frechet_distance_of_features(f1, f2)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(exact_distance_of_features(f1, f2), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that the product is singular
        reference = pytorch_fid_distance(*frechet.gaussian_statistics(f1), *frechet.gaussian_statistics(f2))
    assert got == pytest.approx(reference, rel=1e-6)


def test_statistics_match_numpy():
    f = np.random.default_rng(4).normal(size=(12, 5)).astype(np.float32)
    mu, sigma = frechet.gaussian_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    centred = f.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 11, rtol=1e-12)  # unbiased (ddof=1)


def test_bad_shapes():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet.frechet_distance(mu, np.eye(3), mu, np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.gaussian_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.gaussian_statistics(np.zeros(4))
    with pytest.raises(ValueError, match="NaN or infinity"):
        frechet.frechet_distance(mu, sigma, np.full(4, np.nan), sigma)
