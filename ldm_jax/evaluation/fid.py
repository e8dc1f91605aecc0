"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the Inception-v3
pool features of two image sets, with the standard FID network (``ldm_jax.models.inception``,
pytorch-fid's port of TensorFlow's FID graph), so values are comparable with pytorch-fid's.

The weights are read from a local file the user gives (``--inception_weights``): pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, or its ``.safetensors`` / ``.npz`` conversion (see
``ldm_jax.models.inception``). Without it the metric is unavailable (``FIDUnavailable``), never
computed with other weights.

    extractor = InceptionFeatures("pt_inception-2015-12-05.safetensors")
    fid(real_uint8, generated_uint8, extractor)             # [N, H, W, 3] each
    save_statistics("train_stats.npz", *statistics(real_uint8, extractor))   # cache a split once
    fid_from_statistics(generated_uint8, load_statistics("train_stats.npz"), extractor)

The ``.npz`` statistics use pytorch-fid's keys (``mu``, ``sigma``), so its ``--save-stats``
files load too. FID is biased upwards for small sets; papers use 50k samples. Compare values
computed with the same number of images.
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable

import jax
import numpy as np

from ldm_jax.evaluation import frechet
from ldm_jax.models import inception


class FIDUnavailable(RuntimeError):
    """FID cannot be computed: the Inception weights file was not given or does not exist."""


_HOW_TO_GET = (
    f"FID needs the standard FID Inception-v3 weights as a local file: download "
    f"{inception.FID_WEIGHTS_URL} on a machine with internet, optionally convert it to "
    f".safetensors (see ldm_jax.models.inception; the .pth itself needs torch), and pass "
    f"--inception_weights=PATH")


def check_weights(path: str | os.PathLike | None) -> None:
    """Raise ``FIDUnavailable`` (saying which file is needed and how to get it) unless ``path``
    names an existing file. Its content is checked when loaded (``InceptionFeatures``)."""
    if path is None or str(path) == "":
        raise FIDUnavailable(f"no --inception_weights given. {_HOW_TO_GET}")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise FIDUnavailable(f"--inception_weights={path} {what}. {_HOW_TO_GET}")


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def batched_apply(fn: Callable[[np.ndarray], jax.Array], images: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``images`` [N, ...] in batches of exactly ``batch_size`` (the last one padded
    with zeros and its padding dropped), so a jitted ``fn`` compiles once per image size.
    Returns the concatenated host results [N, ...]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        outputs.append((fn(batch), n))  # dispatch all batches before waiting on any
    if not outputs:
        raise ValueError("batched_apply: no images")
    return np.concatenate([np.asarray(out)[:n] for out, n in outputs])


def _forward(params, images):
    return inception.InceptionV3().apply({"params": params}, images)


class InceptionFeatures:
    """The FID network with its weights loaded and one jitted forward; ``features(images)`` ->
    ``[N, 2048]`` float32 pool3 features of uint8 images [N, H, W, 3] (any size: resized to 299
    inside), computed ``batch_size`` at a time on the default device."""

    def __init__(self, path: str | os.PathLike | None, batch_size: int = 50):
        check_weights(path)
        self._setup(inception.load_params(path), batch_size)

    @classmethod
    def from_params(cls, params: dict, batch_size: int = 50) -> "InceptionFeatures":
        """An extractor with ``params`` already converted (``inception.params_from_state_dict``)."""
        self = cls.__new__(cls)
        self._setup(params, batch_size)
        return self

    def _setup(self, params: dict, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.params = jax.device_put(params)
        # Parameters are an argument, not closed over: a closure would embed 90 MB of constants
        # in the compiled program.
        self._forward = jax.jit(_forward)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Pool3 features [N, 2048] (float32) of uint8 images [N, H, W, 3], N >= 1."""
        images = _check_images(images)
        if len(images) == 0:
            raise ValueError("images: need at least one image, got 0")
        return batched_apply(lambda batch: self._forward(self.params, batch), images, self.batch_size)


def statistics(images: np.ndarray, extractor: InceptionFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) float64 of the features of >= 2 uint8 images."""
    images = _check_images(images)
    if len(images) < 2:
        raise ValueError(f"images: FID statistics need at least 2 images, got {len(images)}")
    return frechet.gaussian_statistics(extractor.features(images))


def fid(images_a: np.ndarray, images_b: np.ndarray, extractor: InceptionFeatures) -> float:
    """FID between two sets of uint8 images [N, H, W, 3] (each N >= 2; sizes may differ)."""
    return frechet.frechet_distance(*statistics(images_a, extractor), *statistics(images_b, extractor))


def fid_from_statistics(images: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
                        extractor: InceptionFeatures) -> float:
    """FID of uint8 images [N, H, W, 3] against cached reference statistics ``(mu, sigma)``
    (``load_statistics``)."""
    return frechet.frechet_distance(*statistics(images, extractor), *reference)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` [D] and ``sigma`` [D, D] (float64) to the ``.npz`` file at exactly ``path``."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_statistics(mu, sigma, f"save_statistics({path})")
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a ``save_statistics`` (or pytorch-fid ``--save-stats``) ``.npz``."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"FID statistics: {path} does not exist or is not a file")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in ("mu", "sigma")}
            keys = sorted(npz.files)
    except Exception as e:  # not an .npz, truncated, or object arrays (pickles: refused)
        raise ValueError(f"FID statistics: cannot read {path} as .npz without unpickling "
                         f"({type(e).__name__}: {e})") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"FID statistics: {path} has no {', '.join(missing)} "
                         f"(keys {keys}; expected mu [D], sigma [D, D])")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    _check_statistics(mu, sigma, f"FID statistics {path}")
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{where}: need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
