"""Images as the reference's model sees them: any file Pillow reads, fully decoded, EXIF-oriented, in
RGB (with every check of a broken or hostile file), and the reference's evaluation transform (a fixed
resize, then ToTensor and ImageNet Normalize) computed with Pillow and torch as torchvision computes it,
so that scoring images needs neither torchvision nor pandas."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from presets import IMAGENET_MEAN, IMAGENET_STD, TRANSFORMS

__all__ = ["DataError", "IMAGE_FORMATS", "to_rgb", "load_image", "decode_image", "link_leaves_folder", "Resize",
           "EvalTransform", "to_normalised_tensor"]

# Raster formats we open; others (EPS via Ghostscript, PDF, ...) are refused as not images.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "JPEG2000")
# The filters of the reference's resizes: torchvision's Resize on a PIL image is Pillow's bilinear
# resize; the AVA script's img.resize() uses Pillow's default, bicubic.
RESAMPLE = {"torchvision": Image.Resampling.BILINEAR, "pil": Image.Resampling.BICUBIC}


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


def _decode(source: str | IO[bytes], name: str, draft: tuple[int, int] | None) -> Image.Image:
    """Decode an opened file or a path; every failure is a DataError naming ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=_open_formats()) as img:
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", draft)  # decode at a reduced size, at least ``draft`` (changes pixels)
                img.load()
                oriented = ImageOps.exif_transpose(img)
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


def decode_image(data: bytes, name: str, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """``load_image`` for the bytes of an image file in memory (``name`` only labels messages)."""
    if not data:
        raise DataError(f"image file {name} is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, draft)


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


def to_normalised_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image -> (3, H, W) float32 in ImageNet normalisation, with torchvision's ToTensor and
    Normalize arithmetic (so the values are the same to the bit)."""
    pixels = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    tensor = pixels.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


class EvalTransform:
    """The reference's evaluation transform of a data style ("tad66k" or "ava", ``presets.TRANSFORMS``):
    its fixed resize, then ToTensor and ImageNet Normalize."""

    def __init__(self, style: str) -> None:
        if style not in TRANSFORMS:
            raise ValueError(f"transform style must be 'tad66k' or 'ava', got {style!r}")
        spec = TRANSFORMS[style]
        self.style = style
        self.resize = Resize(spec.eval_size, spec.resizer)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(self.resize(img))

    def __repr__(self) -> str:
        return f"EvalTransform({self.style!r}: {self.resize!r}, ToTensor, Normalize(ImageNet))"
