"""The persistent run queue: submit, cancel, inspect and watch runs; dispatch is delegated.

    store = RunStore("~/ditgraph/queue.sqlite3")      # app.runs.store
    queue = RunQueue(store, LocalDispatcher(engine))   # app.runs.local: one worker thread, one engine
    queue.start()
    record = queue.submit(workflow_document, client_id="tab-1")
    queue.subscribe(lambda client_id, event: ...)      # engine + queue events, per run

Each run writes its files into its own subfolder of the output folder (named by the run
id), so runs never overwrite each other's outputs.

Dispatch sits behind :class:`Dispatcher` (start / notify / cancel / stop): the local
implementation runs one engine in one thread; a pool of remote workers (app.runs.ray_dispatch)
implements the same methods and claims runs from the same store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from app.core.workflow import Problem, Workflow, WorkflowError, errors
from app.runs.store import RunRecord, RunStore, new_run_id

log = logging.getLogger(__name__)

Listener = Callable[[str | None, dict], None]  # (client_id of the run's submitter, event)


class Dispatcher(Protocol):
    """Executes queued runs. The local one runs them in a thread; a remote pool (Ray, ...)
    implements the same methods, claims runs from ``queue.store`` and reports through
    ``queue.publish`` / ``queue.complete``."""

    def start(self, queue: RunQueue) -> None: ...

    def notify(self) -> None:
        """New work was queued."""

    def cancel(self, run_id: str) -> bool:
        """Ask a running run to stop at its next step boundary; False if it is not running here."""

    def stop(self, timeout: float = 10.0) -> None: ...

    def describe(self) -> dict: ...


class RunQueue:
    """Submit, cancel, inspect and watch runs; dispatch is delegated."""

    def __init__(self, store: RunStore, dispatcher: Dispatcher, validator: Callable[[Workflow, list[str] | None], list[Problem]],
                 max_retries: int = 2, keep_history: int = 10000):
        self.store = store
        self.dispatcher = dispatcher
        self.validator = validator
        self.max_retries = max_retries
        self.keep_history = keep_history
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> tuple[list[str], list[str]]:
        """Recover runs interrupted by a crash, then start dispatching."""
        requeued, failed = self.store.recover(self.max_retries)
        for run_id in requeued:
            log.warning("run %s was interrupted by a restart; queued again", run_id)
        for run_id in failed:
            log.warning("run %s was interrupted too many times; marked failed", run_id)
        self.store.prune(self.keep_history)
        self.dispatcher.start(self)
        self.started = True
        self.dispatcher.notify()
        return requeued, failed

    def stop(self, timeout: float = 10.0) -> None:
        if self.started:
            self.dispatcher.stop(timeout)
            self.started = False

    # -- events --------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, client_id: str | None, event: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(client_id, event)
            except Exception:  # a broken listener must not break the queue
                log.exception("event listener failed")

    def _publish_queue_state(self) -> None:
        counts = self.store.counts()
        self.publish(None, {"type": "queue", "queued": counts.get("queued", 0), "running": counts.get("running", 0)})

    # -- runs ----------------------------------------------------------------------------
    def submit(self, document: Any, client_id: str | None = None, targets: list[str] | None = None,
               front: bool = False) -> RunRecord:
        """Validate and queue a workflow (``front``: ahead of every queued run); raises WorkflowError
        (nothing queued) if invalid."""
        workflow = Workflow.from_dict(document)
        if targets is not None:
            targets = [str(t) for t in targets]
        problems = errors(self.validator(workflow, targets))
        if problems:
            raise WorkflowError(problems)
        run_id = new_run_id()
        record = RunRecord(id=run_id, workflow=workflow.to_dict(), client_id=client_id, targets=targets,
                           output_subfolder=run_id)
        self.store.add(record)
        if front:
            self.store.move_to_front(run_id)
        position = self.store.position(run_id)
        self.publish(client_id, {"type": "run_queued", "run_id": run_id, "position": position})
        self._publish_queue_state()
        self.dispatcher.notify()
        return record

    def cancel(self, run_id: str) -> str | None:
        """Cancel a queued or running run. Returns its status after the request (None: unknown run)."""
        with self._lock:
            record = self.store.get(run_id)
            if record is None:
                return None
            if record.status == "queued" and self.store.cancel_queued(run_id):
                self.publish(record.client_id, {"type": "run_cancelled", "run_id": run_id, "node": None})
                self._publish_queue_state()
                return "cancelled"
            record = self.store.get(run_id)
            if record.status == "running":
                self.dispatcher.cancel(run_id)
                return "cancelling"
            return record.status

    def cancel_all(self) -> dict:
        with self._lock:
            cancelled = self.store.cancel_all_queued()
            for run_id in cancelled:
                record = self.store.get(run_id)
                self.publish(record.client_id if record else None, {"type": "run_cancelled", "run_id": run_id, "node": None})
            running = [r.id for r in self.store.active() if r.status == "running"]
            for run_id in running:
                self.dispatcher.cancel(run_id)
        self._publish_queue_state()
        return {"cancelled": cancelled, "cancelling": running}

    def move_to_front(self, run_id: str) -> int | None:
        """Run a queued run next. Its new position (0), or None when it is not queued."""
        if not self.store.move_to_front(run_id):
            return None
        record = self.store.get(run_id)
        self.publish(record.client_id if record else None, {"type": "run_queued", "run_id": run_id, "position": 0})
        self._publish_queue_state()
        return self.store.position(run_id)

    def get(self, run_id: str) -> RunRecord | None:
        return self.store.get(run_id)

    def position(self, run_id: str) -> int | None:
        return self.store.position(run_id)

    # -- called by dispatchers -----------------------------------------------------------
    def claim(self, worker: str, register: Callable[[RunRecord], None] | None = None) -> RunRecord | None:
        """Take the next queued run; ``register`` runs under the queue lock so a cancel can't slip between."""
        with self._lock:
            record = self.store.claim_next(worker)
            if record is not None and register is not None:
                register(record)
        if record is not None:
            self._publish_queue_state()
        return record

    def complete(self, record: RunRecord, status: str, **fields: Any) -> None:
        self.store.finish(record.id, status, **fields)
        self._publish_queue_state()
