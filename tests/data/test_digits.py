import numpy as np
import pytest
from sklearn.datasets import load_digits

from ldm_jax.data import digits
from ldm_jax.data.builder import prepare

SIZE = 16  # a multiple of 8, so each 8x8 pixel is a 2x2 block


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The digits built twice with the same seed, into two data dirs: {split: records} each."""
    built = []
    for run in range(2):
        builder = prepare("digits", str(tmp_path_factory.mktemp(f"digits{run}")), image_size=SIZE)
        built.append((builder, {split: [source[i] for i in range(len(source))]
                                for split, source in builder.as_data_source().items()}))
    return built


def test_splits_partition_all_rows(sources):
    builder, records = sources[0]
    assert {split: len(r) for split, r in records.items()} == {"train": 1_497, "test": 300}
    rows = [r["index"] for split in records.values() for r in split]
    assert sorted(rows) == list(range(1_797))  # every row once, none in both splits
    assert builder.info.features["label"].num_classes == 10


def test_features_shapes_and_dtypes(sources):
    for r in sources[0][1]["test"]:
        assert r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8
        assert isinstance(r["caption"], bytes) and 0 <= r["label"] <= 9


def test_captions_match_labels_and_sklearn(sources):
    data = load_digits()
    words = "zero one two three four five six seven eight nine".split()
    for split in sources[0][1].values():
        for r in split:
            assert r["label"] == data.target[r["index"]]
            assert r["caption"].decode() == f"a handwritten digit {words[r['label']]}"
    assert digits.caption(7) == "a handwritten digit seven"


def test_images_are_the_sklearn_digits_upscaled(sources):
    data = load_digits()
    for r in sources[0][1]["test"]:
        image = r["image"].astype(np.float64)
        np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey in RGB
        blocks = image[..., 0].reshape(8, SIZE // 8, 8, SIZE // 8).mean(axis=(1, 3))
        np.testing.assert_array_equal(blocks, np.round(data.images[r["index"]] * 255 / 16))
        assert image.mean() > 10  # a digit, not a blank


def test_same_seed_same_split_and_other_seed_differs(sources):
    (_, first), (_, second) = sources
    for split in ("train", "test"):
        assert {r["index"] for r in first[split]} == {r["index"] for r in second[split]}
    assert set(digits.split_indices(1, 300)["test"]) != {r["index"] for r in first["test"]}
