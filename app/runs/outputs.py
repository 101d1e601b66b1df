"""Exactly-once run outputs: a run writes into a staging folder; its record is the commit point.

    <outputs>/.staging/<run folder>/...   written while the run executes
    <outputs>/<run folder>/...            published after the store recorded how the run ended

The order makes a crash at any point harmless: before the record, the staging folder is thrown
away on the next start and the requeued run writes its files again (once); after the record,
the next start finishes the move. So a run that ends has exactly its files, and a run that is
run again never leaves a second copy (or a half-written ``.tmp``) behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from app.runs.store import FINISHED, RunStore

log = logging.getLogger(__name__)

STAGING = ".staging"


def staging_root(output_root: Path) -> Path:
    return Path(output_root) / STAGING


def staging_dir(output_root: Path, subfolder: str) -> Path:
    """Where a run writes before it is recorded (its run folder under ``.staging``)."""
    return staging_root(output_root) / subfolder


def publish(output_root: Path, subfolder: str) -> None:
    """Move a recorded run's staged files to its run folder (a rename when the folder is new)."""
    source, target = staging_dir(output_root, subfolder), Path(output_root) / subfolder
    if not source.is_dir():
        return
    try:
        os.rename(source, target)  # atomic; fails when the run folder already exists
        return
    except OSError:
        pass
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, destination)
    shutil.rmtree(source, ignore_errors=True)


def discard(output_root: Path, subfolder: str) -> None:
    """Throw away what a run staged (it will run again, or never ran to an end)."""
    shutil.rmtree(staging_dir(output_root, subfolder), ignore_errors=True)


def recover(output_root: Path, store: RunStore) -> tuple[list[str], list[str]]:
    """At start: publish the staged files of runs recorded as ended, drop the rest. (published, dropped)"""
    root = staging_root(output_root)
    published, dropped = [], []
    if not root.is_dir():
        return published, dropped
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        record = store.get(folder.name)
        if record is not None and record.status in FINISHED:
            publish(output_root, folder.name)
            published.append(folder.name)
        else:
            discard(output_root, folder.name)
            dropped.append(folder.name)
    for stray in (p for p in root.iterdir() if not p.is_dir()):
        stray.unlink(missing_ok=True)
    if published or dropped:
        log.warning("outputs recovered after a crash: %d run folder(s) published, %d dropped",
                    len(published), len(dropped))
    return published, dropped
