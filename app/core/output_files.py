"""Output file names: a confined prefix and the next free numbered file (never overwrites)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from app.core import paths


def split_prefix(base: Path, prefix: str) -> tuple[Path, str, str]:
    """(folder, subfolder relative to base, file stem prefix), confined to ``base``."""
    prefix = prefix.strip() or "ditgraph"
    sub, _, stem = prefix.replace("\\", "/").rpartition("/")
    folder = paths.confine(base, sub) if sub else base.resolve()
    stem = re.sub(r"[^\w.\- ]+", "_", stem) or "ditgraph"
    return folder, sub, stem


def claim_path(folder: Path, stem: str, suffix: str) -> Path:
    """The next ``{stem}_{n:05d}{suffix}`` that does not exist, created empty so no one else takes it."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+){re.escape(suffix)}$")
    counter = 1 + max((int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))), default=0)
    while True:
        path = folder / f"{stem}_{counter:05d}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            counter += 1
