import itertools

import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.evaluation import shapes as checker
from tests.data.test_shapes import read_split


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_checker_scores_the_datasets_own_images(shapes_dir, split):
    data = read_split(shapes_dir, split)
    acc = checker.accuracy([ex["image"] for ex in data], [ex["caption"].decode() for ex in data])
    assert acc["ok"] >= 0.99, acc


def test_checker_rejects_altered_images():
    rng = np.random.default_rng(1)
    for colour, shape, position in itertools.islice(itertools.cycle(shapes.ALL_COMBINATIONS), 0, 90, 7):
        img = shapes.render(32, colour, shape, position, rng)
        assert checker.check(img, shapes.caption(colour, shape, position))["ok"]
        other_colour = next(c for c in shapes.COLOURS if c != colour)
        recoloured = img.copy()
        recoloured[img.max(-1) > 0] = shapes.COLOURS[other_colour]
        r = checker.check(recoloured, shapes.caption(colour, shape, position))
        assert not r["colour_ok"] and r["shape_ok"] and r["position_ok"] and not r["ok"]
        other_shape = next(s for s in shapes.SHAPES if s != shape)
        r = checker.check(shapes.render(32, colour, other_shape, position, rng), shapes.caption(colour, shape, position))
        assert r["colour_ok"] and not r["shape_ok"] and r["position_ok"]
        other_place = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}[position]
        r = checker.check(shapes.render(32, colour, shape, other_place, rng), shapes.caption(colour, shape, position))
        assert r["colour_ok"] and r["shape_ok"] and not r["position_ok"]
    assert checker.check(np.zeros((32, 32, 3), np.uint8), "a red circle on the left") == dict(
        colour_ok=False, shape_ok=False, position_ok=False, ok=False)
    with pytest.raises(ValueError, match="not a shapes caption"):
        checker.check(np.zeros((32, 32, 3), np.uint8), "a purple circle on the left")
