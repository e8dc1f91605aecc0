"""`shapes`: procedural captioned shapes, ldm_jax's default (offline) training set.

One filled shape on a black S x S canvas, no anti-aliasing, captioned "a {colour} {shape} {place}".
6 colours x 3 shapes x 5 places = 90 combinations. `train` (20,000) and `test` (2,000) use 78 of
them; `heldout` (1,000) uses the other 12, which never occur in train or test, so a model's
accuracy on it measures compositional generalisation. The held-out combinations (each colour
twice, each shape four times, each place two or three times, so every attribute is still seen in
training):

    red circle on the left,       red square on the right,
    green triangle at the top,    green circle at the bottom,
    blue square in the center,    blue triangle on the left,
    yellow circle on the right,   yellow square at the top,
    magenta triangle at the bottom, magenta circle in the center,
    cyan square on the left,      cyan triangle on the right.

Geometry (x right, y down, pixel centres at integer + 0.5): size (circle diameter, square side,
triangle base and height) 0.40 S with +-10% uniform jitter; the shape's bounding-box centre is the
place's anchor (left (0.25S, 0.5S), right (0.75S, 0.5S), top (0.5S, 0.25S), bottom (0.5S, 0.75S),
center (0.5S, 0.5S)) with +-0.04 S uniform jitter per axis. Triangles are upright isosceles.
Everything is deterministic given the builder config's seed.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data.builder import ArrayRecordBuilder, captioned_image_features, png_bytes

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {  # position name -> (caption phrase, anchor as a fraction of S)
    "left": ("on the left", (0.25, 0.5)),
    "right": ("on the right", (0.75, 0.5)),
    "top": ("at the top", (0.5, 0.25)),
    "bottom": ("at the bottom", (0.5, 0.75)),
    "center": ("in the center", (0.5, 0.5)),
}
HELDOUT = (
    ("red", "circle", "left"), ("red", "square", "right"),
    ("green", "triangle", "top"), ("green", "circle", "bottom"),
    ("blue", "square", "center"), ("blue", "triangle", "left"),
    ("yellow", "circle", "right"), ("yellow", "square", "top"),
    ("magenta", "triangle", "bottom"), ("magenta", "circle", "center"),
    ("cyan", "square", "left"), ("cyan", "triangle", "right"),
)
ALL_COMBINATIONS = tuple(itertools.product(COLOURS, SHAPES, PLACES))
SEEN = tuple(c for c in ALL_COMBINATIONS if c not in HELDOUT)
SIZE_FRACTION, SIZE_JITTER, POSITION_JITTER = 0.40, 0.10, 0.04


def caption(colour: str, shape: str, position: str) -> str:
    """The caption of a combination, e.g. "a red circle on the left"."""
    return f"a {colour} {shape} {PLACES[position][0]}"


def render(size: int, colour: str, shape: str, position: str, rng: np.random.Generator) -> np.ndarray:
    """One image [size, size, 3] uint8 with the shape drawn as specified in the module docstring."""
    d = SIZE_FRACTION * size * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    ax, ay = PLACES[position][1]
    cx = ax * size + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * size
    cy = ay * size + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= (d / 2) ** 2
    elif shape == "square":
        mask = (np.abs(x - cx) <= d / 2) & (np.abs(y - cy) <= d / 2)
    elif shape == "triangle":  # apex (cx, cy - d/2), base from (cx -+ d/2, cy + d/2)
        depth = y - (cy - d / 2)
        mask = (depth >= 0) & (y <= cy + d / 2) & (np.abs(x - cx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    image = np.zeros((size, size, 3), np.uint8)
    image[mask] = COLOURS[colour]
    return image


@dataclasses.dataclass(kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed; the config name must identify them (it names the folder)."""

    image_size: int = 32
    train_size: int = 20_000
    test_size: int = 2_000
    heldout_size: int = 1_000
    seed: int = 0


def shapes_config(image_size: int = 32, train_size: int = 20_000, test_size: int = 2_000,
                  heldout_size: int = 1_000, seed: int = 0) -> ShapesConfig:
    """A ShapesConfig named after its settings ("32" for the default)."""
    default = (train_size, test_size, heldout_size, seed) == (20_000, 2_000, 1_000, 0)
    name = str(image_size) if default else f"{image_size}_n{train_size}-{test_size}-{heldout_size}_seed{seed}"
    return ShapesConfig(name=name, image_size=image_size, train_size=train_size, test_size=test_size,
                        heldout_size=heldout_size, seed=seed)


class Shapes(ArrayRecordBuilder):
    """Procedural captioned shapes (see the module docstring); prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [shapes_config(32), shapes_config(64)]

    def _info(self):
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=captioned_image_features(
                size,
                colour=tfds.features.ClassLabel(names=list(COLOURS)),
                shape=tfds.features.ClassLabel(names=list(SHAPES)),
                position=tfds.features.ClassLabel(names=list(PLACES)),
            ),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(0, c.train_size, SEEN),
            "test": self._generate_examples(1, c.test_size, SEEN),
            "heldout": self._generate_examples(2, c.heldout_size, HELDOUT),
        }

    def _generate_examples(self, split_index: int, count: int, combinations):
        c = self.builder_config
        rng = np.random.default_rng([c.seed, split_index])
        for i in range(count):
            colour, shape, position = combinations[rng.integers(len(combinations))]
            image = render(c.image_size, colour, shape, position, rng)
            yield i, {
                "image": png_bytes(image),
                "caption": caption(colour, shape, position),
                "colour": colour,
                "shape": shape,
                "position": position,
            }
