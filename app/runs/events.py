"""Run events and outputs as plain JSON: previews as PNG data URLs, saved files located and confined
(and told apart: videos, images, other files).

Shared by the HTTP server, the CLI's --json mode and the Ray workers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core import paths

log = logging.getLogger(__name__)


# -- output files named by UI data ---------------------------------------------------------------


def temp_root() -> Path:
    """Where preview nodes write (UI entries of type "temp"): $DITGRAPH_TEMP or <outputs>/../temp."""
    return paths.temp_dir()


MOVIE_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")  # files a browser shows with <video>, never <img>
MEDIA_KEYS = {"videos": "video", "images": "image"}  # a node's UI data key -> what its files are


def _file_entries(value: Any, depth: int = 0, media: str | None = None):
    """(dict with a "filename", "video"|"image"|None) inside a node's UI data; the media kind is
    the key the entry is listed under ("videos", "images")."""
    if depth > 8:
        return
    if isinstance(value, dict):
        if isinstance(value.get("filename"), str) and value["filename"]:
            yield value, media
            return
        for key, child in value.items():
            yield from _file_entries(child, depth + 1, MEDIA_KEYS.get(key, media))
    elif isinstance(value, list):
        for child in value:
            yield from _file_entries(child, depth + 1, media)


def _annotate(entry: dict, run_dir: Path, output_root: Path) -> None:
    if "path" in entry:
        return
    sub = entry.get("subfolder") if isinstance(entry.get("subfolder"), str) else ""
    if entry.get("type") == "temp":
        root = base = temp_root()
    else:
        root, base = output_root, run_dir
    with contextlib.suppress(OSError, ValueError, TypeError):
        candidate = (base / sub / entry["filename"]).resolve()
        if candidate.is_file():
            entry["path"] = candidate.relative_to(Path(root).resolve()).as_posix()


def annotate_files(ui: Any, run_dir: Path, output_root: Path) -> None:
    """Add ``path`` (relative to the output root, or to the temp root for "temp" files) to each file
    a node just saved (``filename``/``subfolder`` are relative to the run's own folder), and to
    a video's ``poster``.

    The UI dict is the one the memo cache keeps, so a later cache hit still finds the file the
    run that executed the node wrote, whichever run folder that was.
    """
    for entry, _media in _file_entries(ui):
        _annotate(entry, run_dir, output_root)
        if isinstance(entry.get("poster"), dict) and isinstance(entry["poster"].get("filename"), str):
            _annotate(entry["poster"], run_dir, output_root)


def _locate(entry: dict, output_root: Path) -> tuple[str, Path] | None:
    """(kind "output"|"temp", real path) of an annotated entry's existing, confined file."""
    kind = "temp" if entry.get("type") == "temp" else "output"
    root = temp_root() if kind == "temp" else Path(output_root)
    relative = entry.get("path")
    if not isinstance(relative, str):
        return None
    with contextlib.suppress(paths.PathRefused, OSError):
        target = paths.confine(root, relative)
        if target.is_file():
            return kind, target
    return None


@dataclass
class OutputFile:
    """A file a run's UI data names, found on disk: ``kind`` is the folder ("output"|"temp"),
    ``media`` what it is ("video"|"image"|"file"), ``poster`` a video's still (temp path) if any."""

    entry: dict
    kind: str
    target: Path
    media: str
    poster: str | None = None


def saved_outputs(ui: Any, output_root: Path) -> list[OutputFile]:
    """Each existing, confined file a run's (or a node's) UI data names."""
    found = []
    for entry, media in _file_entries(ui):
        located = _locate(entry, output_root)
        if located is None:
            continue
        if Path(entry["filename"]).suffix.lower() in MOVIE_SUFFIXES:
            media = "video"  # SaveAnimated's MP4 and runs recorded before videos had their own key
        poster = entry.get("poster")
        poster_path = None
        if media == "video" and isinstance(poster, dict) and _locate(poster, output_root) is not None:
            poster_path = poster["path"]
        found.append(OutputFile(entry, located[0], located[1], media or "file", poster_path))
    return found


# -- event serialisation (shared by the HTTP server and the CLI's --json mode) -----------------


def preview_data_url(preview: Any, max_side: int = 256) -> str | None:
    """A small PNG data URL of a preview (PIL image, uint8/float array or tensor (H, W, C))."""
    try:
        from PIL import Image

        image = preview
        if not isinstance(image, Image.Image):
            import numpy as np

            array = preview
            if hasattr(array, "detach"):
                array = array.detach().float().cpu().numpy()
            array = np.asarray(array)
            while array.ndim > 3:
                array = array[0]
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = array.transpose(1, 2, 0)  # channels first -> last
            if array.dtype != np.uint8:
                array = (np.clip(array.astype("float32"), 0, 1) * 255).round().astype(np.uint8)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            image = Image.fromarray(array)
        image = image.copy()
        image.thumbnail((max_side, max_side))
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    except Exception as exc:  # a preview is decoration: never fail a run over it
        log.debug("preview not encoded: %s", exc)
        return None


def make_jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON data: tensors and other objects become short descriptions."""
    if depth > 20:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): make_jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [make_jsonable(v, depth + 1) for v in value]
    if isinstance(value, Path):
        return str(value)
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}{tuple(shape)}"
    with contextlib.suppress(Exception):
        text = repr(value)
        return text if len(text) <= 500 else text[:497] + "..."
    return None


def jsonable_event(event: dict) -> dict:
    """An engine event as plain JSON: previews become PNG data URLs."""
    out = {}
    for key, value in event.items():
        if key == "preview":
            if value is not None:
                url = value if isinstance(value, str) else preview_data_url(value)
                if url:
                    out["preview"] = url
            continue
        out[key] = make_jsonable(value)
    return out
