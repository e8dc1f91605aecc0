import os

import jax
import numpy as np
import pytest

from ldm_jax.data import shapes as shapes_data
from ldm_jax.evaluation import network_cache
from ldm_jax.evaluation import shapes as checker
from ldm_jax.evaluation import shapes_features as sf
from tests.data.test_shapes import read_split


@pytest.fixture(scope="module")
def cache_dir():
    """The session's LDM_JAX_CACHE (tests/conftest.py): the shapes feature network is trained
    once for this file and tests/test_evaluate.py."""
    return network_cache.default_cache_dir()


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """Trained once (seconds), or read from the session's cache."""
    return sf.load_classifier(32, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def dataset(shapes_dir):
    """The small shapes build's splits: {split: (images uint8 [N, 32, 32, 3], captions [N])}."""
    out = {}
    for split in ("train", "test", "heldout"):
        records = read_split(shapes_dir, split)
        out[split] = (np.stack([r["image"] for r in records]), [r["caption"].decode() for r in records])
    return out


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_classifier_is_cached_and_names_every_attribute(classifier, cache_dir):
    assert classifier.image_size == 32
    assert classifier.cache_path == sf.cache_file(32, cache_dir) and os.path.exists(classifier.cache_path)
    assert set(classifier.test_accuracy) == {"colour", "shape", "position", "all"}
    assert min(classifier.test_accuracy.values()) > 0.95, classifier.test_accuracy


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_classifier_reads_the_datasets_own_images(classifier, dataset, split):
    """On a build's images (other seeds than its training images; `heldout` holds the
    combinations the LDM never sees), each head names its attribute of the caption."""
    images, captions = dataset[split]
    truth = [checker.parse_caption(c) for c in captions]
    predicted = classifier.predict(images)
    for k, (name, classes) in enumerate(sf.ATTRIBUTES.items()):
        accuracy = np.mean([classes[p] == t[k] for p, t in zip(predicted[name], truth)])
        assert accuracy > 0.95, (name, accuracy)


def test_second_load_reads_the_cache_without_training(classifier, cache_dir, monkeypatch):
    def no_training(image_size):
        raise AssertionError("load_classifier retrained although the cache is valid")

    monkeypatch.setattr(sf, "train_classifier", no_training)
    cached = sf.load_classifier(32, cache_dir=cache_dir)
    assert cached.from_cache and cached.test_accuracy == classifier.test_accuracy
    for a, b in zip(_leaves(cached.params), _leaves(classifier.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_cache_is_trained_and_written(classifier, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sf, "train_classifier", lambda size: calls.append(size) or classifier)
    trained = sf.load_classifier(32, cache_dir=str(tmp_path))
    assert calls == [32] and not trained.from_cache and trained.cache_path == sf.cache_file(32, str(tmp_path))
    cached = sf.load_classifier(32, cache_dir=str(tmp_path))
    assert calls == [32] and cached.from_cache and cached.test_accuracy == classifier.test_accuracy
    for a, b in zip(_leaves(cached.params), _leaves(classifier.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content", ["corrupt", "other_recipe", "other_size"])
def test_unusable_cache_is_retrained_with_a_warning(classifier, tmp_path, monkeypatch, content):
    path = sf.cache_file(32, str(tmp_path))
    os.makedirs(os.path.dirname(path))
    if content == "corrupt":
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 not really a zip file")
    else:  # a well-formed file this recipe did not write for 32x32 images
        sf._save(classifier, path)
        with np.load(path) as f:
            arrays = dict(f)
        arrays["recipe_version" if content == "other_recipe" else "image_size"] += 1
        np.savez(path, **arrays)
    calls = []
    monkeypatch.setattr(sf, "train_classifier", lambda size: calls.append(size) or classifier)
    match = {"corrupt": "unreadable.*retraining", "other_recipe": "recipe version", "other_size": "image size 33"}
    with pytest.warns(UserWarning, match=match[content]):
        loaded = sf.load_classifier(32, cache_dir=str(tmp_path))
    assert calls == [32] and not loaded.from_cache
    assert sf.load_classifier(32, cache_dir=str(tmp_path)).from_cache  # the file was rewritten


def test_shapes_fid_is_small_between_real_sets_and_large_against_non_shapes(classifier, dataset):
    train = dataset["train"][0]
    a, b = train[:300], train[300:]
    assert sf.shapes_fid(a, a, classifier) == pytest.approx(0.0, abs=1e-6)
    real_vs_real = sf.shapes_fid(a, b, classifier)
    noise = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    blank = np.zeros_like(a)
    # One colour only: shapes, but not the data's distribution of them.
    red = np.stack([shapes_data.render(32, "red", *c[1:], np.random.default_rng(i))
                    for i, c in enumerate(shapes_data.ALL_COMBINATIONS * 4)][:300])
    for other in (noise, blank, red):
        assert sf.shapes_fid(other, a, classifier) > 10 * real_vs_real > 0
    assert sf.shapes_fid(b, a, classifier) == pytest.approx(real_vs_real)  # symmetric
    assert sf.features(a, classifier).shape == (300, sf.NUM_FEATURES)


def test_features_do_not_depend_on_the_batch(classifier, dataset):
    images = dataset["test"][0]
    np.testing.assert_allclose(sf.features(images[:3], classifier), sf.features(images, classifier)[:3],
                               rtol=1e-5, atol=1e-6)


def test_block_average_input():
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = sf.to_input(images)
    assert x.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(x[1, 3, 5], images[1, 6:8, 10:12].reshape(4, 3).mean(0) / 255, rtol=1e-6)
    np.testing.assert_array_equal(sf.to_input(images[:, ::2, ::2]), images[:, ::2, ::2] / np.float32(255))



def test_small_images_are_upscaled():
    """Pixel-space runs at 16x16 (and 8x8): nearest upscaling to the network's 32x32."""
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = sf.to_input(images)
    assert x.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(x[:, 2 * 5:2 * 5 + 2, 2 * 7:2 * 7 + 2], np.broadcast_to(
        images[:, 5:6, 7:8] / np.float32(255), (2, 2, 2, 3)))
    assert sf.check_image_size(8) == 8
    for bad in (4, 12, 24):
        with pytest.raises(ValueError, match=f"8 or 16.*got {bad}"):
            sf.check_image_size(bad)


# ----------------------------------------------------------------------------------- diversity


def test_mean_pairwise_distance_closed_form():
    f = np.zeros((2, 3, 2))
    f[0, :, 0] = [0.0, 1.0, 3.0]  # distances 1, 3, 2
    f[1] = [[0, 0], [3, 4], [0, 0]]  # distances 5, 0, 5
    np.testing.assert_allclose(sf.mean_pairwise_distance(f), [2.0, 10 / 3])


def _by_caption(images, captions, per):
    """[M, per, S, S, 3]: the first `per` images of every caption that has that many."""
    groups = {}
    for image, text in zip(images, captions):
        groups.setdefault(text, []).append(image)
    return np.stack([np.stack(g[:per]) for g in groups.values() if len(g) >= per])


def test_diversity_of_identical_real_and_mixed_images(classifier, dataset):
    images, captions = dataset["heldout"]  # 12 captions, ~10 images each
    real = _by_caption(images, captions, 4)  # [12, 4, 32, 32, 3]
    n = len(real)

    def feats(grouped):
        return sf.features(grouped.reshape((-1,) + grouped.shape[2:]), classifier).reshape(len(grouped), 4, -1)

    real_f = feats(real)
    same = sf.diversity(feats(np.repeat(real[:, :1], 4, axis=1)), real_f)  # one image per caption, 4 times
    assert same["diversity"] == 0.0 and same["diversity_ratio"] == 0.0
    assert same["real_diversity"] > 0 and same["num_captions"] == n and same["samples_per_caption"] == 4

    itself = sf.diversity(real_f, real_f)
    assert itself["diversity"] == pytest.approx(itself["real_diversity"]) and itself["diversity_ratio"] == 1.0
    assert itself["diversity"] == pytest.approx(sf.mean_pairwise_distance(real_f).mean())

    # Each "caption" drawn from four different captions: far more varied than one caption's images.
    mixed = sf.diversity(feats(np.stack([real[(np.arange(4) + i) % n, np.arange(4)] for i in range(n)])), real_f)
    assert mixed["diversity_ratio"] > 2.0
    assert mixed["diversity_ratio"] == pytest.approx(mixed["diversity"] / mixed["real_diversity"])
    assert mixed["diversity_ci95"] > 0


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named(classifier, dataset):
    images = dataset["test"][0][:4]
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32.*got 48"):
        sf.load_classifier(48)
    with pytest.raises(ValueError, match="uint8"):
        sf.features(images.astype(np.float32), classifier)
    with pytest.raises(ValueError, match=r"\[N, S, S, 3\]"):
        sf.features(images[..., 0], classifier)
    with pytest.raises(ValueError, match="reads 32x32 images, got 64x64; load_classifier\\(64\\)"):
        sf.features(np.zeros((2, 64, 64, 3), np.uint8), classifier)
    with pytest.raises(ValueError, match=r"need features \[N, K >= 2, D\]"):
        sf.mean_pairwise_distance(np.zeros((3, 1, 8)))
    with pytest.raises(ValueError, match="NaN"):
        sf.mean_pairwise_distance(np.full((3, 2, 8), np.nan))
