import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.data import digits as digits_data
from ldm_jax.evaluation import digits, network_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """Trained once for the module (a few seconds), cached in a temporary folder."""
    return digits.load_classifier(16, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def real_test():
    """The real test digits at 16x16 (images uint8 [300, 16, 16, 3], labels [300])."""
    return digits.real_digits(16)["test"]


def test_block_average_recovers_the_8x8_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    for size in (8, 16, 32):
        images = np.stack([digits_data.to_image(d, size) for d in data.images[:20]])
        np.testing.assert_allclose(digits.to_grey8(images)[..., 0], np.round(data.images[:20] * 255 / 16) / 255,
                                   atol=1e-7)


def test_classifier_is_trained_and_cached(classifier, cache_dir):
    assert not classifier.from_cache
    assert classifier.cache_path == digits.cache_file(cache_dir) and os.path.exists(classifier.cache_path)
    assert classifier.test_accuracy >= 0.95


def test_accuracy_is_the_same_at_every_image_size(classifier):
    for size in (16, 32):
        images, labels = digits.real_digits(size)["test"]
        assert np.mean(classifier.predict(images) == labels) == classifier.test_accuracy


def test_second_load_reads_the_cache_without_training(classifier, cache_dir, monkeypatch):
    def no_training():
        raise AssertionError("load_classifier retrained although the cache is valid")

    monkeypatch.setattr(digits, "train_classifier", no_training)
    cached = digits.load_classifier(32, cache_dir=cache_dir)
    assert cached.from_cache and cached.test_accuracy == classifier.test_accuracy
    for a, b in zip(_leaves(cached.params), _leaves(classifier.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_corrupt_cache_is_retrained_to_the_same_network(classifier, tmp_path):
    path = digits.cache_file(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not really a zip file")
    with pytest.warns(UserWarning, match="unreadable.*retraining"):
        retrained = digits.load_classifier(16, cache_dir=str(tmp_path))
    assert not retrained.from_cache and retrained.test_accuracy == classifier.test_accuracy
    # Deterministic recipe: the same parameters as the first training (up to float round-off).
    for a, b in zip(_leaves(retrained.params), _leaves(classifier.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert digits.load_classifier(16, cache_dir=str(tmp_path)).from_cache  # the file was rewritten


def test_cache_from_another_recipe_is_retrained(classifier, tmp_path, monkeypatch):
    path = digits.cache_file(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    np.savez(path, recipe_version=np.int64(digits.RECIPE_VERSION + 1), test_accuracy=np.float64(1.0))
    calls = []
    monkeypatch.setattr(digits, "train_classifier", lambda: calls.append(1) or classifier)
    with pytest.warns(UserWarning, match="recipe version"):
        loaded = digits.load_classifier(16, cache_dir=str(tmp_path))
    assert calls == [1] and loaded.test_accuracy == classifier.test_accuracy


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path))
    assert digits.cache_file() == os.path.join(str(tmp_path), "digit_classifier", f"v{digits.RECIPE_VERSION}.npz")
    monkeypatch.delenv("LDM_JAX_CACHE")
    assert network_cache.default_cache_dir() == os.path.expanduser("~/.cache/ldm_jax")


def test_digit_accuracy_with_true_and_shuffled_captions(classifier, real_test):
    images, labels = real_test
    captions = [digits_data.caption(int(v)) for v in labels]
    result = digits.digit_accuracy(images, captions, classifier)
    assert result["accuracy"] == pytest.approx(classifier.test_accuracy)
    assert result["classifier_test_accuracy"] == classifier.test_accuracy
    assert len(result["per_digit"]) == 10 and min(result["per_digit"]) >= 0.8
    json.dumps(result)
    # Labels, captions and TFDS's bytes captions are the same prompts.
    assert digits.digit_accuracy(images, labels, classifier) == result
    assert digits.digit_accuracy(images, [c.encode() for c in captions], classifier) == result
    shuffled = np.random.default_rng(0).permutation(labels)
    assert 0.03 <= digits.digit_accuracy(images, shuffled, classifier)["accuracy"] <= 0.2


def test_per_digit_is_none_for_absent_digits(classifier, real_test):
    images, labels = real_test
    keep = labels < 3
    result = digits.digit_accuracy(images[keep], labels[keep], classifier)
    assert result["per_digit"][3:] == [None] * 7
    assert all(0.8 <= v <= 1.0 for v in result["per_digit"][:3])
    counts = np.bincount(labels[keep], minlength=3)
    assert result["accuracy"] == pytest.approx(np.dot(result["per_digit"][:3], counts) / counts.sum())


def test_digits_fid(classifier, real_test):
    images, _ = real_test
    assert digits.digits_fid(images, images, classifier) == pytest.approx(0.0, abs=1e-6)
    train_images = digits.real_digits(16)["train"][0]
    real_vs_real = digits.digits_fid(images, train_images[:300], classifier)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    real_vs_noise = digits.digits_fid(images, noise, classifier)
    assert real_vs_noise > 10 * real_vs_real > 0  # about 316 vs 16
    assert digits.features(images, classifier).shape == (300, digits.NUM_FEATURES)


def test_parse_caption():
    for d in range(10):
        assert digits.parse_caption(digits_data.caption(d)) == d
    for bad in ("a handwritten digit ten", "a red circle on the left", "a handwritten digit 7", ""):
        with pytest.raises(ValueError, match="not a digits caption"):
            digits.parse_caption(bad)


def test_bad_inputs_are_named(classifier, real_test):
    images, labels = real_test
    with pytest.raises(ValueError, match="multiple of 8"):
        digits.digit_accuracy(np.zeros((2, 12, 12, 3), np.uint8), [0, 1], classifier)
    with pytest.raises(ValueError, match="uint8"):
        digits.digit_accuracy(images.astype(np.float32), labels, classifier)
    with pytest.raises(ValueError, match=r"\[N, S, S, 3\]"):
        digits.digit_accuracy(images[..., 0], labels, classifier)
    with pytest.raises(ValueError, match="300 images but 299"):
        digits.digit_accuracy(images, labels[:-1], classifier)
    with pytest.raises(ValueError, match="0..9, got 10"):
        digits.digit_accuracy(images[:1], [10], classifier)
    with pytest.raises(ValueError, match="not a digits caption: 'a blue square'"):
        digits.digit_accuracy(images[:1], ["a blue square"], classifier)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8"):
        digits.load_classifier(12)
