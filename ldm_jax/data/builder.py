"""What every ldm_jax dataset builder shares, and `prepare(name, data_dir, ...)`.

Builders are TFDS `GeneratorBasedBuilder`s written in `array_record`, which tensorflow-datasets
writes and reads without TensorFlow (images are handed over as PNG bytes). Any other dataset
already prepared in array_record under a data_dir is read by name with `tfds.builder`.
"""
from __future__ import annotations

import importlib
import inspect
import io
import os
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
        factory = _resolve(config_path)
        parameters = inspect.signature(factory).parameters
        required = [k for k, p in parameters.items() if p.default is inspect.Parameter.empty]
        unknown, missing = sorted(set(options) - set(parameters)), [k for k in required if k not in options]
        if unknown or missing:
            problem = f"unknown options {unknown}" if unknown else f"missing options {missing}"
            allowed = ", ".join(f"{k} (required)" if k in required else k for k in parameters)
            raise ValueError(f"bad option for dataset {name!r}: {problem}; its options are {allowed}")
        config = factory(**options)
        builder_cls = _resolve(builder_path)
        if config.name in builder_cls.builder_configs:  # a predefined config: TFDS wants its name
            config = config.name
        return builder_cls(config=config, data_dir=data_dir)
    if options:
        raise ValueError(f"options {sorted(options)} are only for ldm_jax's own datasets ({', '.join(BUILDERS)})")
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT)
    except Exception as e:  # tfds raises several types for unknown names
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"unknown dataset {name!r}: not one of ldm_jax's ({', '.join(BUILDERS)}) and not a TFDS "
            f"dataset prepared under {data_dir} ({first_line})"
        ) from None


def prepare(name: str, data_dir: str, **options) -> tfds.core.DatasetBuilder:
    """Build dataset `name` into `data_dir` (offline; a no-op if it is already there). A build
    that fails leaves no folders behind (TFDS removes its files, not the folders it made)."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    existed = _folders(data_dir)
    builder = load_builder(name, data_dir, **options)
    if name not in BUILDERS and not builder.is_prepared():  # TFDS would try to download it
        raise ValueError(f"dataset {name!r} is a TFDS dataset not prepared under {data_dir}: ldm_jax builds only "
                         f"its own ({', '.join(BUILDERS)}) offline; prepare it with `tfds build {name} "
                         f"--data_dir {data_dir} --file_format array_record` where it can be downloaded")
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, try_download_gcs=False
            )
        )
    except BaseException:
        for folder in sorted(_folders(data_dir) - existed, reverse=True):  # the deepest first
            if not os.listdir(folder):
                os.rmdir(folder)
        raise
    return builder


def _folders(root: str) -> set[str]:
    """`root` and every folder under it (none if it does not exist)."""
    if not os.path.isdir(root):
        return set()
    return {root} | {os.path.join(path, d) for path, dirs, _ in os.walk(root) for d in dirs}
