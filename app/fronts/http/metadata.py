"""Image bytes without decoding pixels: the format by magic bytes, a PNG's text chunks, a size check."""

from __future__ import annotations

import io
import zlib

from app.fronts.http.settings import MB

IMAGE_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}


def sniff_image(data: bytes) -> str | None:
    """'png', 'jpeg' or 'webp' by magic bytes; None otherwise."""
    for kind, magics in IMAGE_MAGIC.items():
        if any(data.startswith(m) for m in magics):
            return kind
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png_text_chunks(data: bytes, max_text: int = 16 * MB) -> dict[str, str]:
    """The tEXt / zTXt / iTXt entries of a PNG, without decoding its pixels."""
    if not data.startswith(IMAGE_MAGIC["png"][0]):
        raise ValueError("not a PNG file")
    texts: dict[str, str] = {}
    offset = 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        if len(body) < length:
            break
        offset += 12 + length
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                texts[key.decode("latin-1")] = _inflate(rest[1:], max_text).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _language, _, rest = rest.partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                texts[key.decode("latin-1")] = (_inflate(value, max_text) if compressed else value).decode("utf-8")
            elif kind == b"IEND":
                break
        except (ValueError, IndexError, zlib.error, UnicodeDecodeError):
            continue
    return texts


def _inflate(data: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj()
    out = decompressor.decompress(data, limit)
    if decompressor.unconsumed_tail:
        raise ValueError("compressed text too large")
    return out


def verify_image(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if size[0] * size[1] > 16384 * 16384:
            raise ValueError(f"{size[0]}x{size[1]} pixels is too large")
        image.verify()
    return size
