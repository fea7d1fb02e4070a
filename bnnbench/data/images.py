"""Decoding one encoded image into RGB pixels, with errors that name the file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BadImageError

# The extensions torchvision's ImageFolder accepts; other files are not images to us either.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """Decode ``data`` (any format Pillow reads) into a uint8 RGB array of shape (H, W, 3).

    Grey-scale, palette and CMYK images are converted to RGB.  Truncated or unreadable data
    raise :class:`BadImageError` naming ``name``; nothing is ever returned half-decoded
    (unless the caller switched on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``).
    """
    if not data:
        raise BadImageError(name, "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(name, str(exc) or type(exc).__name__) from None
