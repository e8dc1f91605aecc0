"""FID plumbing without the Inception network: unavailable weights, fixed-shape batching, FID and
cached statistics through a stand-in feature extractor, and the statistics file format. (The
network and its features are tested against pytorch-fid in tests/models/test_inception.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.evaluation import fid, frechet


class MeanColourFeatures:
    """A stand-in extractor: per-image channel means and their squares, [N, 6]."""

    def features(self, images):
        m = np.asarray(images, np.float64).mean(axis=(1, 2)) / 255
        return np.concatenate([m, m ** 2], axis=1)


def random_images(n, seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("path", [None, ""])
def test_no_weights_is_unavailable(path):
    with pytest.raises(fid.FIDUnavailable, match="--inception_weights") as e:
        fid.check_weights(path)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
    with pytest.raises(fid.FIDUnavailable):
        fid.InceptionFeatures(path)


def test_missing_weights_file_is_unavailable(tmp_path):
    missing = tmp_path / "pt_inception.safetensors"
    with pytest.raises(fid.FIDUnavailable, match=r"inception\.safetensors does not exist.*--inception_weights"):
        fid.InceptionFeatures(str(missing))
    with pytest.raises(fid.FIDUnavailable, match="is a directory"):
        fid.check_weights(tmp_path)
    missing.write_bytes(b"")
    fid.check_weights(missing)  # exists: its content is checked on loading
    assert issubclass(fid.FIDUnavailable, RuntimeError)


def test_batched_apply_pads_and_compiles_once():
    traces = []

    @jax.jit
    def fn(batch):
        traces.append(batch.shape)
        return jnp.sum(batch.astype(jnp.float32), axis=(1, 2))  # [B, 3]

    images = random_images(7, seed=0)
    got = fid.batched_apply(fn, images, batch_size=3)  # batches of 3, 3, 1 + 2 padding
    np.testing.assert_array_equal(got, images.astype(np.float32).sum(axis=(1, 2)))
    assert traces == [(3, 8, 8, 3)]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fid.batched_apply(fn, images, batch_size=0)


def test_fid_through_an_extractor():
    extractor = MeanColourFeatures()
    a, b = random_images(20, seed=1), random_images(15, seed=2) // 2
    assert fid.fid(a, a, extractor) == pytest.approx(0.0, abs=1e-6)
    expected = frechet.frechet_distance_of_features(extractor.features(a), extractor.features(b))
    assert expected > 1e-3
    assert fid.fid(a, b, extractor) == pytest.approx(expected, rel=1e-12)
    reference = fid.statistics(a, extractor)
    assert fid.fid_from_statistics(b, reference, extractor) == pytest.approx(expected, rel=1e-12)


def test_bad_images():
    extractor = fid.InceptionFeatures.from_params({}, batch_size=2)  # fails before any compile
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got float32 \(2, 8, 8, 3\)"):
        extractor.features(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got uint8 \(2, 8, 8\)"):
        extractor.features(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        extractor.features(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        fid.fid(random_images(1, 0), random_images(4, 1), MeanColourFeatures())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fid.InceptionFeatures.from_params({}, batch_size=0)


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(9, 5)), rowvar=False)
    path = tmp_path / "train_stats"  # no suffix: written at exactly this path
    fid.save_statistics(path, mu, sigma)
    got_mu, got_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    # pytorch-fid's --save-stats files: float32 under the same keys.
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert fid.load_statistics(tmp_path / "pytorch_fid.npz")[1].dtype == np.float64


def test_bad_statistics_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz does not exist"):
        fid.load_statistics(tmp_path / "absent.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"has no sigma \(keys \['mu'\]"):
        fid.load_statistics(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\], got \(3,\) and \(4, 4\)"):
        fid.load_statistics(tmp_path / "mismatch.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        fid.load_statistics(tmp_path / "text.npz")
    with pytest.raises(ValueError, match=r"got \(3,\) and \(3,\)"):
        fid.save_statistics(tmp_path / "bad.npz", np.zeros(3), np.zeros(3))
