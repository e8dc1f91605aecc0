import unicodedata

import numpy as np
import pytest

from ldm_jax.data import emoji
from ldm_jax.data.builder import prepare

SIZE, COUNT = 32, 40


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A 40-emoji subset, all splits: a list of records."""
    builder = prepare("emoji", str(tmp_path_factory.mktemp("emoji")), image_size=SIZE, max_emoji=COUNT)
    sources = builder.as_data_source()
    assert {split: len(s) for split, s in sources.items()} == {"train": 36, "test": 4}
    return [s[i] for s in sources.values() for i in range(len(s))]


def test_captions_are_unicode_names_of_single_codepoints(records):
    assert len({r["codepoint"] for r in records}) == COUNT
    for r in records:
        caption = r["caption"].decode()
        assert caption == unicodedata.name(chr(r["codepoint"])).lower()
        assert unicodedata.lookup(caption) == chr(r["codepoint"])  # the name of one codepoint


def test_white_background_and_coloured_content(records):
    coloured = 0
    for r in records:
        image = r["image"]
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert (image[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all(), r["caption"]
        assert (image < 250).any(axis=-1).mean() > 0.05, r["caption"]  # something drawn
        coloured += (np.ptp(image.astype(int), axis=-1) > 60).any()  # not a grey glyph
    assert coloured >= COUNT // 2


def test_red_apple_is_red():
    image = emoji.render(0x1F34E, SIZE, emoji.load_font(emoji.OVERSAMPLE * SIZE)).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 120) & (image[..., 2] < 120)
    assert red.mean() > 0.2


def test_catalogue_keeps_only_named_single_codepoints():
    codepoints = emoji.emoji_codepoints()
    assert len(codepoints) > 1_000
    assert 0x1F34E in codepoints and 0x1F600 in codepoints
    assert not any(0xE000 <= cp <= 0xF8FF for cp in codepoints)  # OpenMoji's private-use extras
