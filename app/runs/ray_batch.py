"""Run a list of workflows (a ``--batch`` fans out) on Ray workers through a private run queue.

What the caller shows (text, JSON lines, a progress line) stays with the caller: this module only
calls the :class:`BatchHooks` it is given (the CLI's are in app.fronts.cli_run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.core.workflow import Workflow
from app.runs.queue import RunQueue
from app.runs.ray_dispatch import RayDispatcher
from app.runs.ray_pool import RayPool
from app.runs.store import FINISHED, RunRecord, RunStore


class RayUnavailable(Exception):
    """Ray could not be reached or no worker started: bad input for the caller, nothing ran."""

    def __init__(self, *messages: str):
        super().__init__("; ".join(messages))
        self.messages = list(messages)


def _ignore(*_args) -> None:
    return None


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


@dataclass
class BatchHooks:
    """How the caller sees a batch. ``number`` is the batch line (None for a single run)."""

    on_event: Callable[[int | None, dict], None] = _ignore  # every engine/queue event of a run
    on_result: Callable[[int | None, RunRecord], None] = _ignore  # a run ended (its final record)
    on_note: Callable[[str], None] = _ignore  # one line for a person (retries, interrupts)
    on_progress: Callable[[int, int, int], None] = _ignore  # (done, total, running)
    on_abort: Callable[[], None] = _raise_interrupt  # a second Ctrl-C: quit without waiting


def run_batch(address: str, registry, workflows: list[tuple[int | None, Workflow]], targets: list[str] | None,
              out_root: Path, hooks: BatchHooks, *, device: str | None = None, workers: int | None = None,
              log_to_driver: bool = True, engine_options: dict | None = None) -> list[str]:
    """Each workflow's final status, in order. Output goes where a local run puts it (batch line k ->
    OUTPUT_DIR/batch-000k/); each worker's engine gets ``engine_options`` (VRAM budget, cache policy).
    Raises RayUnavailable when no worker could start."""
    tmp = Path(tempfile.mkdtemp(prefix="ditgraph-ray-"))
    store = RunStore(tmp / "queue.sqlite3")
    pool = queue = None
    numbers: dict[str, int | None] = {}
    changed = threading.Event()
    try:
        try:
            pool = RayPool.create(address, registry, device=device, workers=workers, log_to_driver=log_to_driver,
                                  engine_options=engine_options)
        except ConnectionError as exc:
            raise RayUnavailable(f"--ray {address}: {exc}") from None
        # a new private store: another process's staged runs in out_root are not its to settle
        queue = RunQueue(store, RayDispatcher(pool, out_root, recover=False), validator=lambda workflow, wanted: [])
        queue.subscribe(_listener(numbers, changed, hooks))
        for number, workflow in workflows:
            record = RunRecord(id=f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(3).hex()}",
                               workflow=workflow.to_dict(), targets=targets,
                               output_subfolder="." if number is None else f"batch-{number:04d}")
            numbers[record.id] = number
            store.add(record)
        if pool.wait_ready(count=1) == 0:
            errors = sorted({slot.error or "did not start in time" for slot in pool.slots})
            raise RayUnavailable(*(f"--ray {address}: no worker started: {error}" for error in errors))
        hooks.on_note(f"ray: {len(workflows)} run(s) on {len(pool.slots)} worker(s)")
        queue.start()
        return _wait(queue, store, numbers, changed, hooks)
    finally:
        if queue is not None:
            queue.stop(timeout=10)
        elif pool is not None:
            pool.close()
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _listener(numbers: dict[str, int | None], changed: threading.Event, hooks: BatchHooks):
    def listen(client_id: str | None, event: dict) -> None:
        if event.get("type") == "queue":
            changed.set()
        run_id = event.get("run_id")
        if run_id in numbers:
            hooks.on_event(numbers[run_id], event)

    return listen


def _wait(queue: RunQueue, store: RunStore, numbers: dict[str, int | None], changed: threading.Event,
          hooks: BatchHooks) -> list[str]:
    reported: dict[str, str] = {}
    interrupted = False
    while len(reported) < len(numbers):
        try:
            changed.wait(0.25)
            changed.clear()
        except KeyboardInterrupt:
            if interrupted:
                hooks.on_abort()
            interrupted = True
            queue.cancel_all()
            hooks.on_note("\ncancelling at the next step boundary (Ctrl-C again to quit now)")
            continue
        for run_id, number in numbers.items():
            record = None if run_id in reported else store.get(run_id)
            if record is not None and record.status in FINISHED:
                reported[run_id] = record.status
                hooks.on_result(number, record)
        hooks.on_progress(len(reported), len(numbers), store.counts().get("running", 0))
    return [reported[run_id] for run_id in numbers]
