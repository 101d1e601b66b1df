"""Workflows embedded in files ComfyUI saves: PNG text chunks, WEBP EXIF, video container tags.

``read_embedded_workflow(path_or_bytes)`` returns the JSON documents found, keyed by what
ComfyUI calls them: ``"workflow"`` (the editor format, or a ditgraph workflow) and
``"prompt"`` (the API format). No pixels are decoded. Compressed text is capped in TOTAL
(a PNG may hold many small zTXt chunks that together inflate to gigabytes).
"""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from app.core.images import MAX_TEXT_BYTES, ImageRefused, png_text_chunks

MB = 1024 * 1024
TEXT_BUDGET = MAX_TEXT_BYTES  # all decompressed text of one file together (the server's one cap)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# ComfyUI's SaveAnimatedWEBP writes "prompt:{...}" into EXIF tag 0x0110 and each extra_pnginfo
# entry ("workflow:{...}") into 0x010f, 0x010e, ... downwards
WEBP_TAGS = range(0x0100, 0x0111)
VIDEO_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3")  # ISO-BMFF (mp4/mov) at offset 4, Matroska/WebM at 0
KEYS = ("workflow", "prompt")


class EmbeddedWorkflowError(ValueError):
    """The file carries no workflow we can read, with a one-line reason (``too_large``: refused for its size)."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def png_texts(data: bytes, budget_bytes: int = TEXT_BUDGET) -> dict[str, str]:
    """The tEXt / zTXt / iTXt entries of a PNG (app.core.images' reader: decompressed text capped in total)."""
    try:
        return png_text_chunks(data, budget_bytes)
    except ImageRefused as exc:
        raise EmbeddedWorkflowError(str(exc), too_large=exc.too_large) from None


def _riff_chunks(data: bytes):
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        yield kind, data[offset + 8:offset + 8 + size]
        offset += 8 + size + (size & 1)


def webp_texts(data: bytes) -> dict[str, str]:
    """``key:{json}`` strings from a WEBP's EXIF chunk (how ComfyUI's WEBP savers embed workflows)."""
    from PIL import Image

    texts: dict[str, str] = {}
    for kind, body in _riff_chunks(data):
        if kind != b"EXIF":
            continue
        exif = Image.Exif()
        try:
            with warnings.catch_warnings():  # a damaged tag is skipped; the others may hold the workflow
                warnings.simplefilter("ignore")
                exif.load(body[6:] if body.startswith(b"Exif\0\0") else body)
        except (ValueError, SyntaxError, OSError, struct.error) as exc:
            raise EmbeddedWorkflowError(f"the WEBP's EXIF data is damaged ({exc})") from None
        for tag in WEBP_TAGS:
            value = exif.get(tag)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and ":" in value:
                key, _, text = value.partition(":")
                if key.isidentifier():
                    texts[key] = text
    return texts


def _unescape_ffmetadata(text: str) -> dict[str, str]:
    """``key=value`` lines of ffmpeg's metadata dump; a backslash escapes = ; # \\ and newlines."""
    entries: dict[str, str] = {}
    key, escaped, in_value, current = "", False, False, []
    for char in text.split("\n", 1)[1] if text.startswith(";FFMETADATA") else text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and not in_value:
            key, current, in_value = "".join(current), [], True
        elif char == "\n":
            if in_value:
                entries[key] = "".join(current)
            current, in_value = [], False
        else:
            current.append(char)
    if in_value:
        entries[key] = "".join(current)
    return entries


def video_texts(data: bytes) -> dict[str, str]:
    """Container tags of an MP4/MOV/WebM/MKV through the bundled ffmpeg (``-f ffmetadata``)."""
    try:
        import imageio_ffmpeg
    except ImportError:  # pragma: no cover - imageio-ffmpeg is a dependency
        raise EmbeddedWorkflowError("reading video metadata needs imageio-ffmpeg") from None
    with tempfile.NamedTemporaryFile(suffix=".video") as handle:
        handle.write(data)
        handle.flush()
        try:
            done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", handle.name, "-f", "ffmetadata", "-"],
                                  capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EmbeddedWorkflowError("ffmpeg took too long to read the video's metadata") from None
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["unreadable"]
        raise EmbeddedWorkflowError(f"ffmpeg cannot read this video: {reason[0]}")
    if len(done.stdout) > TEXT_BUDGET:
        raise EmbeddedWorkflowError(f"the video's metadata is larger than {TEXT_BUDGET // MB} MB")
    tags = _unescape_ffmetadata(done.stdout.decode("utf-8", "replace"))
    return {key.lower(): value for key, value in tags.items()}


def container_of(data: bytes) -> str:
    """'png', 'webp', 'video', 'json', or a refusal naming what the file is."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == VIDEO_MAGIC[0] or data.startswith(VIDEO_MAGIC[1]):
        return "video"
    if data.startswith(b"fLaC"):
        raise EmbeddedWorkflowError("a FLAC audio file: ComfyUI's audio workflows cannot be imported (ditgraph has no audio nodes)")
    if data.startswith(b"glTF"):
        raise EmbeddedWorkflowError("a GLB 3D model: ComfyUI's 3D workflows cannot be imported (ditgraph has no 3D nodes)")
    if data.lstrip()[:1] in (b"{", b"["):
        return "json"
    raise EmbeddedWorkflowError("not a workflow file: expected JSON, or a PNG, WEBP, MP4 or WebM saved by ComfyUI or ditgraph")


READERS = {"png": png_texts, "webp": webp_texts, "video": video_texts}


def embedded_texts(data: bytes) -> dict[str, str]:
    """The metadata texts of a PNG, WEBP or video file (EmbeddedWorkflowError for anything else)."""
    container = container_of(data)
    if container == "json":
        raise EmbeddedWorkflowError("a JSON file, not an image or video")
    return READERS[container](data)


def parse_texts(texts: dict[str, str], container: str = "file") -> dict[str, Any]:
    """The parsed 'workflow' and 'prompt' entries; EmbeddedWorkflowError when neither is readable."""
    found = {}
    for key in KEYS:
        if key in texts:
            try:
                found[key] = json.loads(texts[key])
            except ValueError:
                continue  # the other key may still be readable
    if not found:
        raise EmbeddedWorkflowError(f"this {container} carries no workflow (no readable 'workflow' or 'prompt' metadata)")
    return found


def read_embedded_workflow(source: str | Path | bytes) -> dict[str, Any]:
    """``{"workflow": ..., "prompt": ...}`` (parsed JSON, either may be absent) from a file or its bytes.

    A JSON file is returned as ``{"document": ...}``. Raises EmbeddedWorkflowError with one line.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    container = container_of(data)
    if container == "json":
        try:
            return {"document": json.loads(data.decode("utf-8"))}
        except (ValueError, UnicodeDecodeError) as exc:
            raise EmbeddedWorkflowError(f"not valid JSON ({exc})") from None
    return parse_texts(READERS[container](data), f"{container.upper()} file")
