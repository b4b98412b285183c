"""One way to turn an image file into RGB pixels, used by training, eval and the compression tools, so a
model never sees a picture decoded one way in training and another way when it is scored.

Scraped files are untrusted input, so `open_rgb`:
 * reads a path only if it is a regular file (foundation.files.open_regular: a FIFO named `x.jpg` would
   block the reader for ever, a link to /dev/zero never ends); a path holding a NUL byte is unreadable;
 * reads the header first and refuses an image of more than `max_pixels` pixels before any pixel is
   decoded (a 438 KB PNG can declare 20000x20000 and take gigabytes to decode); PIL's own bomb check is
   left at its default and its error counts as "too large" too;
 * refuses, from the header too, an image whose longer side is more than `max_aspect_ratio` times its
   shorter one: every model transform resizes the shorter side to the model's size S (or crops a square
   first), and an 11.7 KB 1x3,000,000 PNG, far under the pixel limit, would become S x 3,000,000·S. The
   bound keeps any resized image under S x S·max_aspect_ratio pixels (1 M at S = 224, the default ratio);
 * applies the EXIF orientation (PIL.ImageOps.exif_transpose), so a phone photo stored sideways is seen
   upright, as every viewer shows it; an EXIF block that cannot be parsed is ignored (the pixels are fine);
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
from PIL import Image, ImageOps

from foundation.errors import UserError
from foundation.files import NotRegularFile, open_regular

# PIL's own default for Image.MAX_IMAGE_PIXELS (1024**3 // 4 // 3): about 9459x9459, far more than any
# training resolution needs. Above twice this PIL itself refuses the file (DecompressionBombError).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Longer side / shorter side above which an image is refused: panoramas (up to ~12:1) and web banners (728x90,
# 970x90) pass; 1-pixel strips and spacers, which no model transform can use, do not.
DEFAULT_MAX_ASPECT_RATIO = 20

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


class ExtremeAspectRatio(ImageError):
    reason = "extreme aspect ratio"


class UnreadableImage(ImageError):
    reason = "unreadable image"


class NotAFile(UnreadableImage):
    reason = "not a regular file"


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


def open_rgb(source: Source, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
             max_aspect_ratio: Optional[float] = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """The image at `source` (a path, the file's bytes, or a binary file object) as a decoded RGB image,
    by the rules in the module docstring. `max_pixels`: width x height above which the image is refused
    unread (None or 0: only PIL's own limit, 2 x DEFAULT_MAX_IMAGE_PIXELS). `max_aspect_ratio`: longer over
    shorter side above which it is refused unread (None or 0: no limit).

    Raises ImageTooLarge, ExtremeAspectRatio, or UnreadableImage (MissingImage, EmptyImage, NotAFile) for
    anything else that stops it."""
    opened = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise _error(EmptyImage, source)
        file = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            file = opened = open_regular(source)
        except FileNotFoundError:
            raise _error(MissingImage, source) from None
        except NotRegularFile as e:
            raise _error(NotAFile, source, str(e).rsplit(" is ", 1)[-1]) from None
        except ValueError as e:  # a NUL byte in the path
            raise _error(UnreadableImage, source, f"bad path: {e}") from None
        except OSError as e:
            raise _error(UnreadableImage, source, f"{type(e).__name__}: {e.strerror or e}") from None
    else:
        file = source
    try:
        return _decode(file, source, max_pixels, max_aspect_ratio)
    finally:
        if opened is not None:
            opened.close()


def _decode(file, source: Source, max_pixels: Optional[int], max_aspect_ratio: Optional[float]) -> Image.Image:
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
        raise _unreadable(source, file, e) from None
    try:
        width, height = image.size
        if max_pixels and width * height > max_pixels:
            raise _error(ImageTooLarge, source, f"{width}x{height} = {width * height:,} pixels, "
                                                f"over the limit of {max_pixels:,}")
        if max_aspect_ratio and max(width, height) > max_aspect_ratio * max(1, min(width, height)):
            raise _error(ExtremeAspectRatio, source, f"{width}x{height}, sides more than {max_aspect_ratio:g}:1")
        image.load()
        _apply_orientation(image)
        rgb = to_rgb(image)
    except ImageError:
        image.close()
        raise
    except Exception as e:
        image.close()
        raise _unreadable(source, file, e) from None
    if rgb is image and getattr(image, "n_frames", 1) > 1:
        rgb = image.copy()  # the first frame, detached: a multi-frame file stays open until closed
    if rgb is not image:
        image.close()
    return rgb


# Where a loaded image's orientation can come from (PIL's Image.getexif): EXIF bytes, PNG's raw EXIF text, a TIFF's
# own tags, or XMP. An image with none of them is upright, and skips the EXIF parse (4.2 -> 0.75 us an image).
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _apply_orientation(image: Image.Image) -> None:
    """Turn a loaded image upright by its EXIF orientation, in place (nothing when it has none). The pixel and
    aspect limits hold either way: a rotation swaps the sides only."""
    if not hasattr(image, "tag_v2") and not any(key in image.info for key in _ORIENTATION_SOURCES):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" for every scraped file that has some
            ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 (a malformed EXIF block: the pixels are still the image's)
        pass


def _unreadable(source: Source, file, error: Exception) -> ImageError:
    # the size only on failure: a good image should not pay a syscall for a clearer message
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.fstat(file.fileno()).st_size == 0:
                return _error(EmptyImage, source)
        except (OSError, ValueError):
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
    raw = np.asarray(image)  # uint16 (I;16B: big-endian), or int32 for mode I
    transparent = image.info.get("transparency")
    # 4 bytes a pixel, computed in place (65535 * 255 + 32767 fits an int32): a 16-bit image at the pixel limit
    # costs about 10 bytes a pixel in all, not the 30 of int64 temporaries
    values = raw.astype(np.int32 if raw.dtype.kind == "i" else np.uint32)
    np.clip(values, 0, 65535, out=values)
    values *= 255
    values += 32767
    values //= 65535  # rounded
    levels = values.astype(np.uint8)
    del values
    if isinstance(transparent, int):
        alpha = np.where(raw == transparent, np.uint8(0), np.uint8(255))
        return Image.fromarray(np.stack([levels, alpha], axis=-1))  # (h, w, 2) uint8: LA
    return Image.fromarray(levels)  # (h, w) uint8: L
