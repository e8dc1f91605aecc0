"""The shapes checker: does an image show what its caption says? Simple, fixed rules only.

foreground = pixels whose max channel > 100; colour = nearest palette colour to the mean
foreground RGB; position = nearest of the five anchors to the foreground centroid; shape = nearest
of {circle 0.785, square 1.0, triangle 0.5} to the foreground's fill ratio of its bounding box. An
empty foreground is wrong on all counts.
"""
from __future__ import annotations

import re

import numpy as np

from ldm_jax.data.shapes import COLOURS, PLACES, SHAPES

FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
FOREGROUND_THRESHOLD = 100
_PHRASES = {phrase: name for name, (phrase, _) in PLACES.items()}
_CAPTION = re.compile(
    rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(map(re.escape, _PHRASES))})$"
)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """"a red circle on the left" -> ("red", "circle", "left"); ValueError for anything else."""
    match = _CAPTION.match(caption.strip())
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r} (expected 'a <colour> <shape> <place>')")
    colour, shape, phrase = match.groups()
    return colour, shape, _PHRASES[phrase]


def describe(image: np.ndarray) -> tuple[str, str, str] | None:
    """What the rules see in image [H, W, 3] uint8: (colour, shape, position), or None if empty."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    mask = image.max(axis=-1) > FOREGROUND_THRESHOLD
    if not mask.any():
        return None
    h, w = mask.shape
    mean_rgb = image[mask].astype(np.float64).mean(axis=0)
    palette = np.array(list(COLOURS.values()), np.float64)
    colour = list(COLOURS)[int(np.argmin(((palette - mean_rgb) ** 2).sum(-1)))]
    ys, xs = np.nonzero(mask)
    centroid = np.array([(xs + 0.5).mean() / w, (ys + 0.5).mean() / h])
    anchors = np.array([anchor for _, anchor in PLACES.values()])
    position = list(PLACES)[int(np.argmin(((anchors - centroid) ** 2).sum(-1)))]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    return colour, shape, position


def check(image: np.ndarray, caption: str) -> dict[str, bool]:
    """{colour_ok, shape_ok, position_ok, ok} for image [H, W, 3] uint8 against its caption."""
    want = parse_caption(caption)
    seen = describe(image)
    if seen is None:
        return dict(colour_ok=False, shape_ok=False, position_ok=False, ok=False)
    result = dict(colour_ok=seen[0] == want[0], shape_ok=seen[1] == want[1], position_ok=seen[2] == want[2])
    result["ok"] = all(result.values())
    return result


def accuracy(images, captions) -> dict[str, float]:
    """Mean of each `check` field over a set of images and their captions."""
    results = [check(image, text) for image, text in zip(images, captions, strict=True)]
    if not results:
        raise ValueError("accuracy needs at least one image")
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}
