"""The local dispatcher: queued runs execute one at a time in a thread, on one in-process engine.

A watchdog thread keeps the queue serving: when the worker thread is gone, the run it held fails
with a message and a fresh worker thread takes the next run. With ``stall_seconds``, a run that
has sent no event for that long once the engine started it is failed and told to stop; the
engine runs one workflow at a time, so the next run starts when that one reaches a step boundary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from app.core import paths
from app.core.workflow import Workflow, WorkflowError
from app.runs import outputs
from app.runs.events import annotate_files, make_jsonable
from app.runs.queue import RunQueue
from app.runs.store import RunRecord

log = logging.getLogger(__name__)


class LocalDispatcher:
    """Runs queued runs one at a time in a thread with one in-process engine."""

    def __init__(self, engine: Any, output_root: str | Path | None = None, poll_seconds: float = 1.0,
                 watch_seconds: float = 1.0, stall_seconds: float | None = None):
        self.engine = engine
        self.output_root = Path(output_root) if output_root else None
        self.poll_seconds = poll_seconds
        self.watch_seconds = watch_seconds
        self.stall_seconds = stall_seconds
        self.worker_id = f"local:{os.getpid()}"
        self.restarts = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._cancel_events: dict[str, threading.Event] = {}
        self._user_cancelled: set[str] = set()
        self._current: str | None = None
        self._beat: float | None = None  # the last event of the run the engine is executing
        self._generation = 0
        self._queue: RunQueue | None = None

    def start(self, queue: RunQueue) -> None:
        self._queue = queue
        self._stopping.clear()
        outputs.recover(self._root(), queue.store)
        self._spawn()
        self._watchdog = threading.Thread(target=self._watch, name="ditgraph-run-watchdog", daemon=True)
        self._watchdog.start()

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str) -> bool:
        event = self._cancel_events.get(run_id)
        if event is None:
            return False
        self._user_cancelled.add(run_id)
        event.set()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking runs. A run in progress stops at its next step boundary and goes back to
        the queue (the next start runs it again); one that does not stop in ``timeout`` stays
        ``running`` in the store and is requeued by the next start's recovery."""
        self._stopping.set()
        for event in list(self._cancel_events.values()):
            event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def describe(self) -> dict:
        return {"kind": "local", "worker": self.worker_id, "running": self._current, "restarts": self.restarts,
                "device": str(getattr(self.engine, "device", "?"))}

    def _root(self) -> Path:
        return Path(self.output_root or getattr(self.engine, "output_dir", None) or paths.output_dir())

    def _register(self, record: RunRecord) -> None:
        self._cancel_events[record.id] = threading.Event()

    # -- the worker thread and its watchdog ---------------------------------------------------------
    def _spawn(self) -> None:
        self._generation += 1
        self._thread = threading.Thread(target=self._loop, args=(self._generation,), name="ditgraph-run-worker",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(self.watch_seconds):
            thread, current, beat = self._thread, self._current, self._beat
            if thread is not None and not thread.is_alive():
                log.error("the run worker stopped unexpectedly (run %s); starting a new one", current)
                self._fail_held(current, "the run worker stopped unexpectedly")
                self._current = None
                self.restarts += 1
                if not self._stopping.is_set():
                    self._spawn()
            elif self.stall_seconds and current is not None and beat is not None \
                    and time.monotonic() - beat > self.stall_seconds:
                log.error("run %s sent no event for %g s; failing it", current, self.stall_seconds)
                self._beat = None
                self._fail_held(current, f"the run sent no progress for {self.stall_seconds:g} s")

    def _fail_held(self, run_id: str | None, reason: str) -> None:
        """Fail a run the worker can no longer finish, and ask it to stop at its next step boundary."""
        if run_id is None:
            return
        if run_id in self._cancel_events:
            self._cancel_events[run_id].set()
        record = self._queue.store.get(run_id)
        if record is not None and record.status == "running":
            self._fail(record, {"message": f"internal error: {reason}; the run was stopped"})

    def _loop(self, generation: int) -> None:
        assert self._queue is not None
        while not self._stopping.is_set() and generation == self._generation:
            try:
                record = self._queue.claim(self.worker_id, self._register)
            except Exception:
                log.exception("could not claim a run")
                record = None
            if record is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            try:
                self._execute(record)
            except BaseException as exc:  # SystemExit from a node included: the worker keeps serving
                log.exception("run %s crashed the dispatcher", record.id)
                self._fail(record, {"message": f"internal error: {type(exc).__name__}: {exc}",
                                    "detail": traceback.format_exc()})
            finally:
                self._cancel_events.pop(record.id, None)
                self._user_cancelled.discard(record.id)
                if self._current == record.id:  # a replaced worker must not clear its successor's run
                    self._current, self._beat = None, None

    # -- one run ------------------------------------------------------------------------------------
    def _execute(self, record: RunRecord) -> None:
        queue = self._queue
        cancel = self._cancel_events[record.id]
        self._current, self._beat = record.id, None
        root = self._root()
        subfolder = record.output_subfolder or record.id
        staging = outputs.staging_dir(root, subfolder)
        outputs.reset(root, subfolder, record.id)  # what an interrupted earlier try left

        def on_event(event: dict) -> None:
            self._beat = time.monotonic()
            if event.get("type") == "node_finished" and event.get("ui"):
                # paths relative to the staging root are the run folder's paths once published
                annotate_files(event["ui"], staging, outputs.staging_root(root))
            queue.publish(record.client_id, event)

        if self._stopping.is_set() and self._interrupted_by_stop(record):
            return  # stop() came between the claim and here: requeue, never "cancelled"
        if cancel.is_set():
            self._end(record, "cancelled", {"message": "cancelled before it started"}, event="run_cancelled")
            return
        try:
            workflow = Workflow.from_dict(record.workflow)
            result = self.engine.run(workflow, record.targets, run_id=record.id, cancel=cancel, on_event=on_event,
                                     output_dir=staging)
        except WorkflowError as exc:
            # valid when queued, invalid now (a model file removed, a plugin gone after a restart)
            self._fail(record, {"message": "the workflow is no longer valid: " + "; ".join(str(p) for p in exc.problems),
                                "problems": [p.to_dict() for p in exc.problems]})
            return
        error = dict(result.error) if result.error else None
        if result.status == "cancelled":
            if self._interrupted_by_stop(record):
                return
            error = {"message": "cancelled"}
        outputs.publish(root, subfolder)  # then the record: see app.runs.outputs
        queue.complete(record, result.status, ui=make_jsonable(result.ui), error=error,
                       timings={k: round(v, 6) for k, v in result.timings.items()}, reasons=result.reasons,
                       executed=result.executed, cached=result.cached)

    def _interrupted_by_stop(self, record: RunRecord) -> bool:
        """A run stopped by shutdown, not by a user, goes back to the queue (its staged files away)."""
        if not self._stopping.is_set() or record.id in self._user_cancelled:
            return False
        self._queue.store.requeue(record.id)
        outputs.discard(self._root(), record.output_subfolder or record.id)
        return True

    def _fail(self, record: RunRecord, error: dict) -> None:
        self._end(record, "failed", error, event="run_failed")

    def _end(self, record: RunRecord, status: str, error: dict, event: str) -> None:
        """Record a run that ended without an engine result (and tell its client)."""
        outputs.publish(self._root(), record.output_subfolder or record.id)
        self._queue.complete(record, status, error=error)
        payload = {"error": {k: v for k, v in error.items() if k != "detail"}} if status == "failed" else {"node": None}
        self._queue.publish(record.client_id, {"type": event, "run_id": record.id, **payload})
