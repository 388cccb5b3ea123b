"""Images as the reference's model sees them: any file Pillow reads, fully decoded, EXIF-oriented, in
RGB (with every check of a broken or hostile file), and the reference's evaluation transform (a fixed
resize, then ToTensor and ImageNet Normalize) computed with Pillow and numpy as torchvision computes it
(the same float32 values to the bit), so that scoring images needs neither torchvision nor pandas, and
scoring an ONNX export not even torch (imported here only to hand a tensor over)."""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, TiffImagePlugin

from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD, TRANSFORMS

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "IMAGE_FORMATS", "to_rgb", "load_image", "decode_image", "PixelBudget", "link_leaves_folder",
           "Resize", "EvalTransform", "to_normalised_array", "to_normalised_tensor"]

# Raster formats we open; others (EPS via Ghostscript, PDF, ...) are refused as not images.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "JPEG2000")
# The filters of the reference's resizes: torchvision's Resize on a PIL image is Pillow's bilinear
# resize; the AVA script's img.resize() uses Pillow's default, bicubic.
RESAMPLE = {"torchvision": Image.Resampling.BILINEAR, "pil": Image.Resampling.BICUBIC}
# A reduced decoding (``reduce_above``) keeps at least this many pixels on the image's shorter side:
# several times the 224 the model sees, so that the evaluation resize still averages over many pixels.
REDUCED_MIN_SIDE = 1024
# Modes whose reduction (a box average) commutes with ``to_rgb``'s conversion, near enough; others
# (palettes, 16-bit and float values scaled by their range) are converted to RGB first.
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr")


class DataError(ValueError):
    """Bad data: a CSV, row or image file that cannot be used (the message names it)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, as load_image converts files: transparency composited onto white,
    16-bit values / 257, 32-bit ints as 8-bit if <= 255 else as 16-bit, floats in 0..1 times 255.

    ValueError for a mode Pillow cannot convert.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode.startswith("I;16"):
            a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        elif mode == "F":  # floats: 0..1 if they fit, else taken as 0..255 values
            a = a.astype(np.float64)
            finite_max = np.nanmax(a) if a.size and np.isfinite(a).any() else 0.0
            a = a * 255.0 if finite_max <= 1.0 else a
        else:  # 32-bit ints: 8-bit values if they fit, else 16-bit (PNG/TIFF), else min-max
            a = a.astype(np.float64)
            top = a.max() if a.size else 0
            if top > 65535:
                low = a.min()
                a = (a - low) * (255.0 / (top - low))
            elif top > 255:
                a = a / 257.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in ("LA", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the names below are known
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


class PixelBudget:
    """The pixels that several images may decode together (the images of one request); ``take``
    charges one image, DataError naming it when its pixels are more than are left."""

    def __init__(self, pixels: int) -> None:
        self.limit = self.left = int(pixels)

    def take(self, pixels: int, name: str) -> None:
        if pixels > self.left:
            raise DataError(f"image file {name} has {pixels:,} pixels to decode, more than the {self.left:,} left "
                            f"of the limit of {self.limit:,} for the images sent together; send it alone or with "
                            f"fewer images")
        self.left -= pixels


def _reduction(size: tuple[int, int], reduce_above: int | None) -> int:
    """1 for an image of at most ``reduce_above`` pixels; else the largest factor of 2, 4 or 8 that
    keeps its shorter side at least REDUCED_MIN_SIDE (1 if none does)."""
    width, height = size
    factor = 1
    if reduce_above is not None and width * height > reduce_above:
        while factor < 8 and min(width, height) // (2 * factor) >= REDUCED_MIN_SIDE:
            factor *= 2
    return factor


_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn, as ImageOps.exif_transpose makes it


def _turn(img: Image.Image) -> Image.Transpose | None:
    """The turn that ``img``'s EXIF orientation asks for (None: none), as ImageOps.exif_transpose makes it."""
    return _TURNS.get(img.getexif().get(ExifTags.Base.Orientation, 1))


_decoding = threading.local()  # .name: the file this thread decodes


class _NamingWarnings:
    """The ``warnings`` module as Pillow's EXIF reader sees it: a warning raised while this thread decodes
    a file ("Corrupt EXIF data. ...", which Pillow words without the file) names that file."""

    def __getattr__(self, attr: str):
        return getattr(warnings, attr)

    def warn(self, message: object, category: type[Warning] | None = None, stacklevel: int = 1,
             source: object = None) -> None:
        name = getattr(_decoding, "name", None)
        if name is not None:
            message = f"image file {name}: {message}"
        warnings.warn(message, category, stacklevel + 1, source)


TiffImagePlugin.warnings = _NamingWarnings()  # where Pillow parses EXIF blocks (of JPEG, PNG, WebP, TIFF)


def _decode(source: str | IO[bytes], name: str, draft: tuple[int, int] | None, reduce_above: int | None = None,
            budget: PixelBudget | None = None) -> Image.Image:
    """Decode an opened file or a path; every failure is a DataError naming ``name``."""
    _decoding.name = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=_open_formats()) as img:
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", draft)  # decode at a reduced size, at least ``draft`` (changes pixels)
                factor = _reduction(img.size, reduce_above)
                if factor > 1 and img.format == "JPEG":  # JPEG decodes at 1/2, 1/4 or 1/8 of its size
                    img.draft("RGB", (img.size[0] // factor, img.size[1] // factor))
                    factor = _reduction(img.size, reduce_above)
                if budget is not None:
                    budget.take(img.size[0] * img.size[1], name)
                img.load()
                turn = _turn(img)
                small = img
                if factor > 1:  # other formats decode whole: reduced before any copy or conversion
                    small = img.reduce(factor) if img.mode in _REDUCIBLE else to_rgb(img).reduce(factor)
                    img.close()  # its pixels are given back now
                # no copy when it needs no turn (exif_transpose copies): the same pixels, less memory
                oriented = small if turn is None else small.transpose(turn)
                try:
                    return to_rgb(oriented)
                except ValueError as exc:
                    raise DataError(f"image file {name} has pixel format {oriented.mode!r}, which cannot be "
                                    f"converted to RGB: {exc}") from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image file {name} refused as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"image file {name} is not a readable image (corrupt, or not one of "
                        f"{', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        raise DataError(f"image file {name} could not be decoded (truncated or corrupt?): "
                        f"{type(exc).__name__}: {exc}") from None
    finally:
        _decoding.name = None


def load_image(path: str | os.PathLike, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open an image file fully decoded, EXIF-oriented, in RGB; DataError naming the file if it
    is missing, empty, not an image, truncated or a decompression bomb.

    Alpha is composited onto white; 16-bit images are scaled to 8 bits (value / 257). ``draft``
    (width, height): decode a JPEG at a reduced size no smaller than that (faster; other pixels).
    """
    p = Path(path)
    try:
        if not p.is_file():
            raise DataError(f"image file {p} not found" if not p.exists() else f"image path {p} is not a file")
        if p.stat().st_size == 0:
            raise DataError(f"image file {p} is empty (0 bytes)")
    except OSError as exc:  # a name too long, a folder that cannot be read, ...
        raise DataError(f"image file {p} cannot be read: {type(exc).__name__}: {exc}") from None
    return _decode(str(p), str(p), draft)


def decode_image(data: bytes, name: str, *, draft: tuple[int, int] | None = None, reduce_above: int | None = None,
                 budget: PixelBudget | None = None) -> Image.Image:
    """``load_image`` for the bytes of an image file in memory (``name`` only labels messages).

    ``reduce_above``: an image of more pixels is decoded reduced, by 2, 4 or 8 on each side but to no
    less than REDUCED_MIN_SIDE on its shorter one (a JPEG while decoding, others before any conversion):
    less memory, other pixels. An image of up to that many pixels is decoded exactly as ``load_image``
    does. ``budget``: the pixels it decodes are charged to it (DataError when too few are left).
    """
    if not data:
        raise DataError(f"image file {name} is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, draft, reduce_above, budget)


def link_leaves_folder(path: str, real_root: str) -> str | None:
    """Where ``path`` really is, when a symbolic link (of the file or of a folder on its way) takes it
    out of the folder whose real path is ``real_root``; None when it stays inside."""
    real = os.path.realpath(path)
    return None if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep) else real


class Resize:
    """Pillow's resize to a fixed (height, width) with the filter of the reference's pipeline."""

    def __init__(self, size: tuple[int, int], resizer: str = "pil") -> None:
        self.size, self.resizer = tuple(size), resizer
        self.resample = RESAMPLE[resizer]

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.resize((self.size[1], self.size[0]), self.resample)

    def __repr__(self) -> str:  # as the torchvision / Pillow step of the reference printed (cache indexes keep it)
        if self.resizer == "torchvision":
            return f"Resize(size={self.size}, interpolation=bilinear, max_size=None, antialias=True)"
        return f"PilResize(size={self.size[::-1]})"


_MEAN = np.asarray(IMAGENET_MEAN, np.float32).reshape(-1, 1, 1)
_STD = np.asarray(IMAGENET_STD, np.float32).reshape(-1, 1, 1)


def to_normalised_array(img: Image.Image) -> np.ndarray:
    """An RGB image -> (3, H, W) float32 numpy array in ImageNet normalisation, with torchvision's
    ToTensor and Normalize arithmetic (float32 division by 255, then minus the mean, divided by the
    std: the same values to the bit)."""
    pixels = np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], 3)
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255)
    chw -= _MEAN
    chw /= _STD
    return chw


def to_normalised_tensor(img: Image.Image) -> torch.Tensor:
    """``to_normalised_array`` as a torch tensor (sharing its memory)."""
    import torch

    return torch.from_numpy(to_normalised_array(img))


class EvalTransform:
    """The reference's evaluation transform of a data style ("tad66k" or "ava", ``preprocessing.TRANSFORMS``):
    its fixed resize, then ToTensor and ImageNet Normalize."""

    def __init__(self, style: str) -> None:
        if style not in TRANSFORMS:
            raise ValueError(f"transform style must be 'tad66k' or 'ava', got {style!r}")
        spec = TRANSFORMS[style]
        self.style = style
        self.resize = Resize(spec.eval_size, spec.resizer)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(self.resize(img))

    def array(self, img: Image.Image) -> np.ndarray:
        """The same transform as a float32 numpy array (the values of ``__call__``, without torch)."""
        return to_normalised_array(self.resize(img))

    def __repr__(self) -> str:
        return f"EvalTransform({self.style!r}: {self.resize!r}, ToTensor, Normalize(ImageNet))"
