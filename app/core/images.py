"""The one way untrusted images are read: the HTTP routes, the CLI and the image/mask loader nodes.

Two bombs are stopped before any large allocation: a small file that declares a huge canvas
(its size is checked against ``max_pixels`` before a single pixel is decoded) and compressed
PNG text that inflates to gigabytes (all text chunks together are capped at ``max_text``).
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000; LoadImage holds 16 bytes a pixel (RGBA float32)
MAX_TEXT_BYTES = 16 << 20  # all of a PNG's text chunks, decompressed
IMAGE_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}


class ImageRefused(ValueError):
    """An image that is not one, or is too large to read; ``too_large`` tells 413 from 400."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def sniff_image(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' by magic bytes; None otherwise."""
    for kind, magics in IMAGE_MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return kind
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A decoded, EXIF-upright image from a path or bytes; ImageRefused when it is not a readable image
    or declares more than ``max_pixels`` pixels (checked from the header, before decoding)."""
    name = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as image:
            _check_pixels(image, name, max_pixels)
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageRefused:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"{name}: {exc}", too_large=True) from None
    except Exception as exc:
        raise ImageRefused(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None


def verify_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of encoded image bytes, checked for size and damage without decoding them all."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, "the image", max_pixels)
            size = image.size
            image.verify()
    except ImageRefused:
        raise
    except Exception as exc:
        raise ImageRefused(f"the image is damaged: {type(exc).__name__}: {exc}") from None
    return size


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRefused(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}",
                           too_large=True)


def png_text_chunks(data: bytes, max_text: int = MAX_TEXT_BYTES) -> dict[str, str]:
    """The tEXt / zTXt / iTXt entries of a PNG, without decoding its pixels. ImageRefused (too_large)
    once the texts together, decompressed, pass ``max_text`` bytes."""
    if not data.startswith(IMAGE_MAGIC["png"][0]):
        raise ImageRefused("not a PNG file")
    texts: dict[str, str] = {}
    budget = [max_text, max_text]  # [left, limit]: uncompressed text is bounded by the file itself
    offset = 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        if len(body) < length or kind == b"IEND":
            break
        offset += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            try:
                key, value = _text_chunk(kind, body, budget)
            except (ValueError, IndexError, zlib.error, UnicodeDecodeError) as exc:
                if isinstance(exc, ImageRefused):
                    raise
                continue  # one damaged chunk does not hide the others
            texts[key] = value
    return texts


def _text_chunk(kind: bytes, body: bytes, budget: list[int]) -> tuple[str, str]:
    key, _, rest = body.partition(b"\0")
    if kind == b"tEXt":
        raw, encoding = rest, "latin-1"
    elif kind == b"zTXt":
        raw, encoding = _inflate(rest[1:], budget), "latin-1"
    else:  # iTXt: compressed flag, method, language\0, translated keyword\0, text
        compressed, rest = rest[0], rest[2:]
        _language, _, rest = rest.partition(b"\0")
        _translated, _, value = rest.partition(b"\0")
        raw, encoding = (_inflate(value, budget) if compressed else value), "utf-8"
    return key.decode("latin-1"), raw.decode(encoding)


def _inflate(data: bytes, budget: list[int]) -> bytes:
    """Decompress at most the bytes left in ``budget`` (shared by all chunks of one image)."""
    decompressor = zlib.decompressobj()
    out = decompressor.decompress(data, budget[0] + 1)
    if len(out) > budget[0] or decompressor.unconsumed_tail:
        raise ImageRefused(f"the PNG's compressed text inflates past {budget[1]} bytes; refused", too_large=True)
    budget[0] -= len(out)
    return out
