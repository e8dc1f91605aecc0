"""`digits`: scikit-learn's 1,797 handwritten 8x8 digits, captioned "a handwritten digit seven".

The UCI optical-recognition digits that ship inside scikit-learn (`sklearn.datasets.load_digits`),
so preparing them needs no network. Each 8x8 image of grey levels 0..16 is scaled to 0..255
(`round(v * 255 / 16)`), upscaled to S x S with nearest-neighbour interpolation and replicated to
RGB: a white digit on black, as the data is. `label` is the digit (ClassLabel 0..9), `index` the
row in `load_digits()`.

Nearest, not bilinear: the data has 8x8 resolution and nothing between those pixels to
interpolate. Nearest keeps it lossless (every pixel is one of the 17 original levels and, for S a
multiple of 8, averaging each S/8 block recovers the 8x8 image exactly), where bilinear would blur
the one-pixel strokes and invent grey levels the data never had.

Splits: a permutation of the 1,797 rows drawn with the config's seed; the first `test_size`
(default 300) are `test`, the other 1,497 `train`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from ldm_jax.data.builder import ArrayRecordBuilder, captioned_image_features, png_bytes

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_DIGITS = 1_797  # rows in sklearn.datasets.load_digits()
MAX_LEVEL = 16  # the data's grey levels are 0..16


def caption(label: int) -> str:
    """The caption of a digit, e.g. "a handwritten digit seven" for 7."""
    return f"a handwritten digit {NUMBER_WORDS[label]}"


def to_image(digit: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 digit (levels 0..16) as an image [size, size, 3] uint8 (nearest upscaling)."""
    grey = np.round(np.asarray(digit, np.float64) * 255.0 / MAX_LEVEL).astype(np.uint8)
    grey = np.asarray(PIL.Image.fromarray(grey).resize((size, size), PIL.Image.Resampling.NEAREST))
    return np.repeat(grey[:, :, None], 3, axis=-1)


def split_indices(seed: int, test_size: int) -> dict[str, np.ndarray]:
    """The rows of `load_digits()` in each split (sorted), fixed by `seed`."""
    order = np.random.default_rng(seed).permutation(NUM_DIGITS)
    return {"train": np.sort(order[test_size:]), "test": np.sort(order[:test_size])}


@dataclasses.dataclass(kw_only=True)
class DigitsConfig(tfds.core.BuilderConfig):
    """Image size, test-split size and seed; the config name must identify them (it names the folder)."""

    image_size: int = 32
    test_size: int = 300
    seed: int = 0


def digits_config(image_size: int = 32, test_size: int = 300, seed: int = 0) -> DigitsConfig:
    """A DigitsConfig named after its settings ("32" for the default)."""
    if not 0 < test_size < NUM_DIGITS:
        raise ValueError(f"digits: test_size must be in 1..{NUM_DIGITS - 1}, got {test_size}")
    default = (test_size, seed) == (300, 0)
    name = str(image_size) if default else f"{image_size}_test{test_size}_seed{seed}"
    return DigitsConfig(name=name, image_size=image_size, test_size=test_size, seed=seed)


class Digits(ArrayRecordBuilder):
    """scikit-learn's handwritten digits with captions (see the module docstring); prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [digits_config(32), digits_config(64)]

    def _info(self):
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=captioned_image_features(
                size,
                label=tfds.features.ClassLabel(num_classes=10),
                index=tfds.features.Scalar(dtype=np.int64),
            ),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            license="CC BY 4.0 (UCI Machine Learning Repository)",
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {split: self._generate_examples(rows) for split, rows in split_indices(c.seed, c.test_size).items()}

    def _generate_examples(self, rows: np.ndarray):
        from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

        data = load_digits()
        size = self.builder_config.image_size
        for row in rows:
            label = int(data.target[row])
            yield int(row), {
                "image": png_bytes(to_image(data.images[row], size)),
                "caption": caption(label),
                "label": label,
                "index": int(row),
            }
