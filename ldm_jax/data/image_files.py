"""Reading an image file as 8-bit RGB (or an 8-bit grey mask), whatever it was saved as.

One reader for the `image_folder` dataset and `python -m ldm_jax.sample`'s --init_image / --mask,
so that a file reads the same everywhere:

- turned upright by its EXIF orientation (phone photos are stored sideways);
- 16-bit (and 32-bit integer) greys scaled to 8 bits: PIL's own conversion clips them at 255,
  which turns a 16-bit PNG nearly white;
- transparency composited onto white (RGB only; a mask is read as its grey level);
- any other mode (palette, CMYK, greyscale, 1-bit) converted by PIL.

A file that cannot be read raises one of `UNREADABLE`; `PIL.Image.MAX_IMAGE_PIXELS` (~179M
pixels, twice PIL's warning threshold) bounds what is decoded.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageOps

# What PIL raises for a file it cannot read: OSError covers truncated data, empty and missing
# files and PIL.UnidentifiedImageError; some broken PNGs raise SyntaxError, some GIFs EOFError;
# DecompressionBombError an image over MAX_IMAGE_PIXELS.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


def _integer_grey_to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Modes I;16* (16-bit) and I (32-bit, 16-bit PNGs in older Pillows) as mode L, scaled by
    255 / 65535 (values that fit in 8 bits are kept as they are in mode I)."""
    values = np.asarray(image).astype(np.float64)
    full_scale = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return PIL.Image.fromarray(np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8), "L")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An opened image as mode RGB (see the module docstring); decodes it."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _integer_grey_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


def to_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """An opened image as mode L (a mask: its grey level, 16-bit scaled, alpha ignored)."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _integer_grey_to_8bit(image)
    return image.convert("L")


def read_rgb(path: str) -> np.ndarray:
    """The image at `path` as uint8 [H, W, 3]; raises one of UNREADABLE."""
    with PIL.Image.open(path) as image:
        image.load()  # decode all of it now, so a truncated file fails here
        return np.asarray(to_rgb(image))


def read_grey(path: str) -> np.ndarray:
    """The image at `path` as uint8 [H, W] (e.g. an inpainting mask); raises one of UNREADABLE."""
    with PIL.Image.open(path) as image:
        image.load()
        return np.asarray(to_grey(image))
