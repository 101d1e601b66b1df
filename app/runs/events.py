"""Run events and outputs as plain JSON: previews as PNG data URLs, saved files located and confined.

Shared by the HTTP server, the CLI's --json mode and the Ray workers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from app.core import paths

log = logging.getLogger(__name__)


# -- output files named by UI data ---------------------------------------------------------------


def temp_root() -> Path:
    """Where preview nodes write (UI entries of type "temp"): $DITGRAPH_TEMP or <outputs>/../temp."""
    env = os.environ.get("DITGRAPH_TEMP")
    return Path(env).expanduser().resolve() if env else paths.output_dir().parent / "temp"


def _file_entries(value: Any, depth: int = 0):
    """The dicts with a "filename" inside a node's UI data."""
    if depth > 8:
        return
    if isinstance(value, dict):
        if isinstance(value.get("filename"), str) and value["filename"]:
            yield value
            return
        for child in value.values():
            yield from _file_entries(child, depth + 1)
    elif isinstance(value, list):
        for child in value:
            yield from _file_entries(child, depth + 1)


def annotate_files(ui: Any, run_dir: Path, output_root: Path) -> None:
    """Add ``path`` (relative to the output root, or to the temp root for "temp" files) to each file
    a node just saved (``filename``/``subfolder`` are relative to the run's own folder).

    The UI dict is the one the memo cache keeps, so a later cache hit still finds the file the
    run that executed the node wrote, whichever run folder that was.
    """
    for entry in _file_entries(ui):
        if "path" in entry:
            continue
        sub = entry.get("subfolder") if isinstance(entry.get("subfolder"), str) else ""
        if entry.get("type") == "temp":
            root = base = temp_root()
        else:
            root, base = output_root, run_dir
        with contextlib.suppress(OSError, ValueError):
            candidate = (base / sub / entry["filename"]).resolve()
            if candidate.is_file():
                entry["path"] = candidate.relative_to(Path(root).resolve()).as_posix()


def file_locations(ui: Any, output_root: Path) -> list[tuple[dict, str, Path]]:
    """(entry, kind "output"|"temp", real path) for each existing, confined file a run's UI data names."""
    found = []
    for entry in _file_entries(ui):
        kind = "temp" if entry.get("type") == "temp" else "output"
        root = temp_root() if kind == "temp" else Path(output_root)
        relative = entry.get("path")
        if not isinstance(relative, str):
            continue
        with contextlib.suppress(paths.PathRefused, OSError):
            target = paths.confine(root, relative)
            if target.is_file():
                found.append((entry, kind, target))
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
