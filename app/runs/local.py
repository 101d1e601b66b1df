"""The local dispatcher: queued runs execute one at a time in a thread, on one in-process engine."""

from __future__ import annotations

import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any

from app.core import paths
from app.core.workflow import Workflow, WorkflowError
from app.runs.events import annotate_files, make_jsonable
from app.runs.queue import RunQueue
from app.runs.store import RunRecord

log = logging.getLogger(__name__)


class LocalDispatcher:
    """Runs queued runs one at a time in a thread with one in-process engine."""

    def __init__(self, engine: Any, output_root: str | Path | None = None, poll_seconds: float = 1.0):
        self.engine = engine
        self.output_root = Path(output_root) if output_root else None
        self.poll_seconds = poll_seconds
        self.worker_id = f"local:{os.getpid()}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancel_events: dict[str, threading.Event] = {}
        self._user_cancelled: set[str] = set()
        self._current: str | None = None
        self._queue: RunQueue | None = None

    def start(self, queue: RunQueue) -> None:
        self._queue = queue
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="ditgraph-run-worker", daemon=True)
        self._thread.start()

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
        return {"kind": "local", "worker": self.worker_id, "running": self._current,
                "device": str(getattr(self.engine, "device", "?"))}

    def _register(self, record: RunRecord) -> None:
        self._cancel_events[record.id] = threading.Event()

    def _loop(self) -> None:
        assert self._queue is not None
        while not self._stopping.is_set():
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
            except Exception as exc:  # a bug here must not kill the worker
                log.exception("run %s crashed the dispatcher", record.id)
                self._queue.complete(record, "failed", error={"message": f"internal error: {type(exc).__name__}: {exc}",
                                                              "detail": traceback.format_exc()})
            finally:
                self._cancel_events.pop(record.id, None)
                self._user_cancelled.discard(record.id)
                self._current = None

    def _execute(self, record: RunRecord) -> None:
        queue = self._queue
        cancel = self._cancel_events[record.id]
        self._current = record.id
        root = self.output_root or getattr(self.engine, "output_dir", None) or paths.output_dir()
        out_dir = Path(root) / (record.output_subfolder or record.id)

        def on_event(event: dict) -> None:
            if event.get("type") == "node_finished" and event.get("ui"):
                annotate_files(event["ui"], out_dir, Path(root))
            queue.publish(record.client_id, event)

        if cancel.is_set():
            queue.complete(record, "cancelled", error={"message": "cancelled before it started"})
            queue.publish(record.client_id, {"type": "run_cancelled", "run_id": record.id, "node": None})
            return
        try:
            workflow = Workflow.from_dict(record.workflow)
            result = self.engine.run(workflow, record.targets, run_id=record.id, cancel=cancel, on_event=on_event,
                                     output_dir=out_dir)
        except WorkflowError as exc:
            # valid when queued, invalid now (a model file removed, a plugin gone after a restart)
            error = {"message": "the workflow is no longer valid: " + "; ".join(str(p) for p in exc.problems),
                     "problems": [p.to_dict() for p in exc.problems]}
            queue.complete(record, "failed", error=error)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
            return
        error = dict(result.error) if result.error else None
        if result.status == "cancelled":
            if self._stopping.is_set() and record.id not in self._user_cancelled:
                queue.store.requeue(record.id)  # interrupted by shutdown, not by a user: run it again later
                return
            error = {"message": "cancelled"}
        queue.complete(record, result.status, ui=make_jsonable(result.ui), error=error,
                       timings={k: round(v, 6) for k, v in result.timings.items()}, reasons=result.reasons,
                       executed=result.executed, cached=result.cached)
