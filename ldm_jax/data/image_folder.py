"""`image_folder`: a folder of the user's own captioned images.

Captions, for each image (first source that has one wins):
  1. `captions.jsonl` in the folder, one `{"file": "cat.jpg", "text": "a cat on a mat"}` a line;
  2. `captions.csv` in the folder, with a header row naming the columns `file` and `text`;
  3. a text file with the image's stem next to it (`cat.txt` for `cat.jpg`).
`file` is relative to the folder. Images without a caption are left out (a warning gives the
count); captions must not be empty.

Images (`.png .jpg .jpeg .webp .bmp .gif .tif .tiff`, any case) are read as 8-bit RGB by
`ldm_jax.data.image_files` (upright by their EXIF orientation, 16-bit greys scaled, transparency
composited onto white, any mode converted), resized so the shorter side is S (LANCZOS) and
centre-cropped to S x S. JPEGs are decoded at reduced scale where that still leaves at least S
pixels a side (`PIL.Image.draft`), which is much faster for photos.

Unreadable files (truncated, empty, not an image whatever their name, over PIL's decompression
limit, missing though listed in a captions table) are skipped, never aborting the build: every
image is decoded before the split is drawn, so the splits hold readable images only. The skipped
files, one `file<TAB>reason` a line, are written to `skipped.txt` next to the prepared data
(`<data_dir>/image_folder/<config>/<version>/skipped.txt`, empty when none; `REPORT_FILE`), and a
warning gives the count.

Splits: the readable captioned images, sorted by file name, permuted with the config's seed; the
first `round(test_fraction * n)` (at least 1 if `test_fraction > 0`, at most n - 1) are `test`,
the rest `train`; with no test images there is only `train`.

The config name is the folder's name plus a hash of its absolute path and the options, so two
folders (or two sizes of one) never share a prepared dataset. Preparing again reuses what is
there: after changing the folder's contents, delete `<data_dir>/image_folder/<config>` first.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import numbers
import os
import re

import numpy as np
import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds
from absl import logging

from ldm_jax.data.builder import ArrayRecordBuilder, captioned_image_features, png_bytes
from ldm_jax.data.image_files import UNREADABLE, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTIONS_JSONL, CAPTIONS_CSV = "captions.jsonl", "captions.csv"
REPORT_FILE = "skipped.txt"


def _reason(error: Exception) -> str:
    """An exception as one line of the skipped-files report."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def read_captions(folder: str) -> dict[str, str]:
    """File (relative to `folder`) -> caption, from the sources in the module docstring."""
    captions: dict[str, str] = {}

    def add(file: str, text: str) -> None:
        if text.strip():
            captions.setdefault(os.path.normpath(file), text.strip())

    jsonl_path = os.path.join(folder, CAPTIONS_JSONL)
    if os.path.exists(jsonl_path):
        for line_number, line in enumerate(_read_text(jsonl_path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                add(entry["file"], entry["text"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{jsonl_path}:{line_number}: expected {{\"file\": ..., \"text\": ...}} "
                                 f"({type(e).__name__}: {e})") from None
    csv_path = os.path.join(folder, CAPTIONS_CSV)
    if os.path.exists(csv_path):
        reader = csv.DictReader(io.StringIO(_read_text(csv_path), newline=""))
        if not {"file", "text"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: the header must name the columns file and text, "
                             f"got {reader.fieldnames}")
        for line_number, row in enumerate(reader, 2):
            if row["file"] is None:
                raise ValueError(f"{csv_path}:{line_number}: expected the columns file and text, got {row}")
            add(row["file"], row["text"] or "")
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        txt_path = os.path.join(folder, stem + ".txt")
        if suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(txt_path):
            add(name, _read_text(txt_path))
    return captions


def _read_text(path: str) -> str:
    """A captions file's text; ValueError naming the file if it is not UTF-8."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: captions must be UTF-8 text ({e})") from None


def load_image(path: str, size: int) -> np.ndarray:
    """The image at `path` as [size, size, 3] uint8 (see the module docstring); raises one of UNREADABLE."""
    with PIL.Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale if still >= size
        image.load()  # decode all of it now, so a truncated file fails here
        image = PIL.ImageOps.fit(to_rgb(image), (size, size), method=PIL.Image.Resampling.LANCZOS)
    return np.asarray(image)


@dataclasses.dataclass(kw_only=True)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """The folder, image size and split; the config name must identify them (it names the folder)."""

    folder: str
    image_size: int = 32
    test_fraction: float = 0.1
    seed: int = 0


def image_folder_config(folder: str, image_size: int = 32, test_fraction: float = 0.1,
                        seed: int = 0) -> ImageFolderConfig:
    """An ImageFolderConfig named "<folder's name>_<hash of its absolute path and the options>";
    ValueError naming the option for a value of the wrong type or out of range."""
    if not isinstance(folder, str) or not folder:
        raise ValueError(f"image_folder: folder must be a path, got {folder!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_folder: image_size must be a positive integer (pixels), got {image_size!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"image_folder: test_fraction must be a number in [0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"image_folder: seed must be an integer, got {seed!r}")
    # numpy scalars as Python numbers (the same JSON for the name's hash)
    image_size, seed = int(image_size), int(seed)
    test_fraction = int(test_fraction) if isinstance(test_fraction, numbers.Integral) else float(test_fraction)
    folder = os.path.abspath(os.path.expanduser(folder))
    settings = json.dumps([folder, image_size, test_fraction, seed])
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(folder)).strip("_")[:40] or "folder"
    return ImageFolderConfig(name=f"{slug}_{digest}", folder=folder, image_size=image_size,
                             test_fraction=test_fraction, seed=seed)


class ImageFolder(ArrayRecordBuilder):
    """The user's captioned images (see the module docstring); prepared offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{__doc__}\nFolder: {self.builder_config.folder}",
            features=captioned_image_features(
                size,
                file=tfds.features.Text(),  # relative to the folder
            ),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        if not os.path.isdir(c.folder):
            raise ValueError(f"image_folder: {c.folder} does not exist or is not a folder")
        captions = read_captions(c.folder)
        uncaptioned = [name for name in sorted(os.listdir(c.folder))
                       if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and name not in captions]
        if uncaptioned:
            logging.warning("image_folder: %d images in %s have no caption and are left out (e.g. %s)",
                            len(uncaptioned), c.folder, ", ".join(uncaptioned[:5]))
        if not captions:
            raise ValueError(f"image_folder: no captioned images in {c.folder} (give captions in "
                             f"{CAPTIONS_JSONL}, {CAPTIONS_CSV} or same-stem .txt files)")

        # Decode everything once before splitting, so that no split can end up empty of readable images.
        readable, skipped = [], []
        for file in sorted(captions):
            try:
                load_image(os.path.join(c.folder, file), c.image_size)
                readable.append(file)
            except UNREADABLE as e:
                skipped.append((file, _reason(e)))
        report = os.path.join(self.data_dir, REPORT_FILE)  # the build's temporary dir, renamed when done
        with open(report, "w", encoding="utf-8") as f:
            f.writelines(f"{file}\t{reason}\n" for file, reason in skipped)
        if skipped:
            logging.warning("image_folder: skipped %d unreadable of %d captioned images in %s "
                            "(listed in %s next to the prepared data)", len(skipped), len(captions),
                            c.folder, REPORT_FILE)
        if not readable:
            raise ValueError(f"image_folder: none of the {len(captions)} captioned images in {c.folder} "
                             f"could be read (first: {skipped[0][0]}: {skipped[0][1]})")

        order = np.random.default_rng(c.seed).permutation(len(readable))
        n_test = min(max(1, round(c.test_fraction * len(readable))), len(readable) - 1) if c.test_fraction else 0
        splits = {"train": sorted(readable[i] for i in order[n_test:])}
        if n_test:
            splits["test"] = sorted(readable[i] for i in order[:n_test])
        return {split: self._generate_examples(files, captions) for split, files in splits.items()}

    def _generate_examples(self, files: list[str], captions: dict[str, str]):
        c = self.builder_config
        for file in files:
            try:  # decoded and encoded in full before yielding: a failure never leaves half a record
                image = png_bytes(load_image(os.path.join(c.folder, file), c.image_size))
            except UNREADABLE as e:  # readable a moment ago: the file changed during the build
                logging.warning("image_folder: skipped %s, unreadable on the second pass (%s)", file, e)
                with open(os.path.join(self.data_dir, REPORT_FILE), "a", encoding="utf-8") as f:
                    f.write(f"{file}\t{_reason(e)}\n")
                continue
            yield file, {"image": image, "caption": captions[file], "file": file}
