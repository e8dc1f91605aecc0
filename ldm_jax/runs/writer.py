"""Metric writing: TensorBoard event files plus `metrics.jsonl`, and image grids / PNGs.

    writer = MetricWriter(workdir)
    writer.write_scalars(step, {"ldm/loss": loss})           # event file + one line of metrics.jsonl
    writer.write_images(step, {"ldm/samples": images})      # uint8 [N, H, W, 3] (gridded) or [H, W, 3]
    writer.close()

Event files are written with tensorboardX (no TensorFlow needed); `tensorboard --logdir <workdir>`
shows them. `metrics.jsonl` holds one JSON object per `write_scalars` call, `{"step": s, **values}`,
appended, so a resumed run continues the same file; non-finite values are written as JSON's
NaN / Infinity extensions, which Python's `json` reads back. Only one process should write
(the loop creates the writer on process 0).
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np
import PIL.Image

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Scalars and images for one run directory (see the module docstring)."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        os.makedirs(self.workdir, exist_ok=True)
        # Event files are named by the second they were opened in; a suffix counting the earlier
        # ones keeps a quick restart from overwriting the previous run's file.
        earlier = sum(name.startswith("events.out.tfevents") for name in os.listdir(self.workdir))
        self._events = SummaryWriter(self.workdir, filename_suffix=f".{earlier}")
        self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars (Python numbers, numpy or jax scalars) at `step`."""
        step = int(step)
        values = {name: float(np.asarray(value)) for name, value in scalars.items()}
        for name, value in values.items():
            self._events.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()  # a line per logging step, readable while the run goes on

    def drop_rows(self, drop) -> None:
        """Rewrite metrics.jsonl without the rows (dicts) for which `drop(row)` is true, and
        without a torn last line (a kill while writing); atomically, then keep appending."""
        path = os.path.join(self.workdir, METRICS_FILE)
        self._jsonl.close()
        with open(path) as f:
            lines = f.read().split("\n")
        kept = []
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # only a kill mid-write makes one; the step is logged again
            if not drop(row):
                kept.append(line + "\n")
        if len(kept) != sum(1 for line in lines if line.strip()):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._jsonl = open(path, "a")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images at `step`: each uint8 [H, W, 3], or [N, H, W, 3] (laid out with `image_grid`)."""
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 4:
                image = image_grid(image)
            _check_image(image, name)
            self._events.add_image(name, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        self._events.flush()
        self._jsonl.flush()

    def close(self) -> None:
        self._events.close()
        self._jsonl.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_image(image: np.ndarray, name: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {name!r} must be uint8 [H, W, 3] (or [N, H, W, 3]); "
                         f"got {image.dtype} {image.shape}")


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] row by row into one [H', W', 3] image.

    `cols` defaults to ceil(sqrt(N)); rows = ceil(N / cols). Every tile is surrounded by `pad`
    pixels of `pad_value` (shared between neighbours), so tile (r, c) starts at
    (pad + r (H + pad), pad + c (W + pad)) and the grid is rows (H + pad) + pad by
    cols (W + pad) + pad. Cells after the last image are left as padding.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"image_grid takes uint8 [N, H, W, 3] with N >= 1; got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] image as PNG, creating the folder if needed."""
    image = np.asarray(image)
    _check_image(image, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    PIL.Image.fromarray(image).save(path, format="PNG")
