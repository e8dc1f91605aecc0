"""What every ldm_jax dataset builder shares, and `prepare(name, data_dir, ...)`.

Builders are TFDS `GeneratorBasedBuilder`s written in `array_record`, which tensorflow-datasets
writes and reads without TensorFlow (images are handed over as PNG bytes). Any other dataset
already prepared in array_record under a data_dir is read by name with `tfds.builder`.
"""
from __future__ import annotations

import importlib
import io
from typing import Callable

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that writes array_record unless told otherwise."""

    def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)


def captioned_image_features(image_size: int, **extra) -> tfds.features.FeaturesDict:
    """The features every ldm_jax dataset has (a PNG `image` [S, S, 3] and a `caption`) plus `extra`."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png"),
        "caption": tfds.features.Text(),
        **extra,
    })


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an image [H, W, 3] uint8 as PNG (what TFDS's Image feature takes without TensorFlow)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# name -> ("module:Builder", "module:config_factory"); the factory turns keyword options into a BuilderConfig.
BUILDERS: dict[str, tuple[str, str]] = {
    "shapes": ("ldm_jax.data.shapes:Shapes", "ldm_jax.data.shapes:shapes_config"),
    "digits": ("ldm_jax.data.digits:Digits", "ldm_jax.data.digits:digits_config"),
    "emoji": ("ldm_jax.data.emoji:Emoji", "ldm_jax.data.emoji:emoji_config"),
    "image_folder": ("ldm_jax.data.image_folder:ImageFolder", "ldm_jax.data.image_folder:image_folder_config"),
}


def _resolve(path: str) -> Callable:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def load_builder(name: str, data_dir: str, **options) -> tfds.core.DatasetBuilder:
    """The builder for `name` (one of ours, configured by `options`, or any TFDS dataset by name)."""
    if name in BUILDERS:
        builder_path, config_path = BUILDERS[name]
        try:
            config = _resolve(config_path)(**options)
        except TypeError as e:
            raise ValueError(f"bad option for dataset {name!r}: {e}") from None
        builder_cls = _resolve(builder_path)
        if config.name in builder_cls.builder_configs:  # a predefined config: TFDS wants its name
            config = config.name
        return builder_cls(config=config, data_dir=data_dir)
    if options:
        raise ValueError(f"options {sorted(options)} are only for ldm_jax's own datasets ({', '.join(BUILDERS)})")
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    except Exception as e:  # tfds raises several types for unknown names
        raise ValueError(
            f"unknown dataset {name!r}: not one of ldm_jax's ({', '.join(BUILDERS)}) and not a TFDS "
            f"dataset prepared under {data_dir} ({e})"
        ) from None


def prepare(name: str, data_dir: str, **options) -> tfds.core.DatasetBuilder:
    """Build dataset `name` into `data_dir` (offline; a no-op if it is already there)."""
    builder = load_builder(name, data_dir, **options)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, try_download_gcs=False
        )
    )
    return builder
