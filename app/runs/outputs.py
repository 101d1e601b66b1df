"""Exactly-once run outputs: a run writes into a staging folder, published in one rename.

    <outputs>/.staging/<run folder>/...   written while the run executes
    <outputs>/<run folder>/...            published (one rename), then the store records the end

A crash at any point is harmless. Before the rename, the staging folder is thrown away (at the
next start, or when the run is tried again). Between the rename and the record, the run is
requeued and its try starts by removing the folder that try published (:func:`reset`), so
clients never see a second copy; after the record, the run is done. A half-written ``.tmp``
can only be left in a staging folder, which is thrown away.
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


def reset(output_root: Path, subfolder: str, run_id: str) -> None:
    """Before a run (or its retry) executes: drop what an earlier, unrecorded try staged or published.
    Only a folder named by the run's id is removed: no other run writes there."""
    discard(output_root, subfolder)
    if subfolder == run_id:
        shutil.rmtree(Path(output_root) / subfolder, ignore_errors=True)


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
