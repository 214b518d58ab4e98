"""Turning user image inputs into RGB PIL images, with errors that say what is wrong."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import xxhash
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs


class ImageError(ValueError):
    """The image input could not be used; the message says why."""


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ImageError(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image could not be decoded: {e}") from None
    return img.convert("RGB")


def load_image(source, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A PIL image, raw bytes, a ``data:`` URL or a local file path -> RGB PIL image."""
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageError(f"image of {source.width}x{source.height} pixels exceeds the limit of {max_pixels}")
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), max_pixels)
    if isinstance(source, str):
        if source.startswith("data:"):
            head, _, payload = source.partition(",")
            if ";base64" not in head:
                raise ImageError("data URL images must be base64-encoded")
            try:
                return decode_image_bytes(base64.b64decode(payload, validate=True), max_pixels)
            except (binascii.Error, ValueError) as e:
                if isinstance(e, ImageError):
                    raise
                raise ImageError(f"invalid base64 in image data URL: {e}") from None
        if source.startswith(("http://", "https://")):
            raise ImageError("remote image URLs are fetched by the API server, not the offline engine")
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise ImageError(f"image file not found: {source}")
        return decode_image_bytes(path.read_bytes(), max_pixels)
    raise ImageError(f"unsupported image input of type {type(source).__name__}")


def image_content_hash(img: Image.Image) -> str:
    """Hash of the decoded pixels: the same picture hashes alike whatever its encoding or URL."""
    h = xxhash.xxh3_128()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()
