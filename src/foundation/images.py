"""One way to turn an image file into RGB pixels, used by training, eval and the compression tools, so a
model never sees a picture decoded one way in training and another way when it is scored.

Scraped files are untrusted input, so `open_rgb`:
 * reads the header first and refuses an image of more than `max_pixels` pixels before any pixel is
   decoded (a 438 KB PNG can declare 20000x20000 and take gigabytes to decode); PIL's own bomb check is
   left at its default and its error counts as "too large" too;
 * opens only the raster formats a crawl or an eval set holds (`FORMATS`): PIL's other plugins include
   EPS, which would run Ghostscript on the file;
 * decodes fully (PIL is lazy: a truncated JPEG only fails on load), so a broken file fails here;
 * scales 16-bit (and 32-bit integer) greyscale from 0..65535 to 0..255: PIL's own convert("RGB") clips
   every value above 255, which makes a 16-bit PNG pure white;
 * composites transparent images (RGBA, LA, PA, P or L/RGB with a transparent colour) over
   `BACKGROUND_RGB`, white: dropping the alpha channel would show whatever colour the invisible pixels
   happen to hold (often black), and white is what a browser shows behind a logo or a cut-out.
Floating-point images (mode F) are converted as PIL does (values taken as 0..255).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image

from foundation.errors import UserError

# PIL's own default for Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3): about 9459x9459, far more than any
# training resolution needs. Above twice this PIL itself refuses the file (DecompressionBombError).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

BACKGROUND_RGB = (255, 255, 255)  # what transparent pixels become (white)

# Formats a web crawl or an eval set holds (JPEG includes the multi-picture JPEGs PIL calls MPO).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM", "ICO")

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]


class ImageError(UserError, OSError):
    """An image that is not used. `reason` names the kind (what bad-sample counts group by), `detail`
    says why; str() is "<source>: <reason> (<detail>)". An OSError too, as PIL's own read errors are,
    so code that already catches those keeps catching these."""

    reason = "unreadable image"
    detail = ""

    @property
    def why(self) -> str:
        """The reason and detail without the source (for callers that name the sample themselves)."""
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


class ImageTooLarge(ImageError):
    reason = "image too large"


class UnreadableImage(ImageError):
    reason = "unreadable image"


class MissingImage(UnreadableImage):
    reason = "missing file"


class EmptyImage(UnreadableImage):
    reason = "0-byte file"


def _error(kind: type, source: Source, detail: str = "") -> ImageError:
    # built with one message argument: DataLoader workers re-raise an exception as type(message)
    error = kind(f"{_name(source)}: {kind.reason}" + (f" ({detail})" if detail else ""))
    error.detail = detail
    return error


def _name(source: Source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "image file"))


def open_rgb(source: Source, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at `source` (a path, the file's bytes, or a binary file object) as a decoded RGB image,
    by the rules in the module docstring. `max_pixels`: width x height above which the image is refused
    unread (None or 0: only PIL's own limit, 2 x DEFAULT_MAX_IMAGE_PIXELS).

    Raises ImageTooLarge, or UnreadableImage (MissingImage, EmptyImage) for anything else that stops it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _error(EmptyImage, source)
        file = io.BytesIO(source)
    else:
        file = source
    try:
        with warnings.catch_warnings():
            # PIL warns once per image past its own limit; ours is checked below and is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file, formats=FORMATS)  # reads the header only
    except FileNotFoundError:
        raise _error(MissingImage, source) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # the warning arrives as an exception only under `python -W error`
        raise _error(ImageTooLarge, source, str(e)) from None
    except Exception as e:
        raise _unreadable(source, e) from None
    try:
        width, height = image.size
        if max_pixels and width * height > max_pixels:
            raise _error(ImageTooLarge, source, f"{width}x{height} = {width * height:,} pixels, "
                                                f"over the limit of {max_pixels:,}")
        image.load()
        rgb = to_rgb(image)
    except ImageError:
        image.close()
        raise
    except Exception as e:
        image.close()
        raise _unreadable(source, e) from None
    if rgb is image and getattr(image, "n_frames", 1) > 1:
        rgb = image.copy()  # the first frame, detached: a multi-frame file stays open until closed
    if rgb is not image:
        image.close()
    return rgb


def _unreadable(source: Source, error: Exception) -> ImageError:
    # the stat only on failure: a good image should not pay a syscall for a clearer message
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                return _error(EmptyImage, source)
        except OSError:
            pass
    if isinstance(error, Image.UnidentifiedImageError):  # its own message only repeats the source
        return _error(UnreadableImage, source, f"not an image in any of {', '.join(FORMATS)}")
    return _error(UnreadableImage, source, f"{type(error).__name__}: {error}")


def to_rgb(image: Image.Image) -> Image.Image:
    """A loaded image in RGB by the module's rules (the image itself when it already is plain RGB)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _sixteen_bit_to_l(image)
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies a palette's or a single colour's transparency too
        background = Image.new("RGBA", image.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PIL mode I;16*, or I: 32-bit integers holding 0..65535, as some Pillow versions
    open 16-bit PNGs and TIFFs) to 8-bit L, 65535 -> 255, keeping a transparent grey level as an alpha channel."""
    values = np.asarray(image).astype(np.int64)  # I;16B is big-endian uint16; int64 holds every case
    levels = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)  # rounded
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([levels, alpha], axis=-1))  # (h, w, 2) uint8: LA
    return Image.fromarray(levels)  # (h, w) uint8: L
