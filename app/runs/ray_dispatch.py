"""The run queue's Ray dispatcher: queued runs go to idle workers of a :class:`RayPool`.

Runs stay ``queued`` in the store until a worker is idle, so they can be cancelled and reordered
like local runs. A worker lost mid-run sends its run back to the queue (``retries`` + 1).

Outputs are exactly-once, by the same mechanism as local runs (app.runs.outputs): a worker
writes into the run's staging folder, each try starts by dropping what an earlier try left,
and the staged files are published (one rename) before the store records the end. The output
folder must be one the workers share with the driver (as it already had to be).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path

from app.core import paths
from app.runs import outputs
from app.runs.queue import RunQueue
from app.runs.ray_pool import RayPool, WorkerSlot
from app.runs.ray_worker import WorkerLost
from app.runs.store import RunRecord, RunStore

log = logging.getLogger(__name__)


class RayDispatcher:
    """Dispatches queued runs to a :class:`RayPool` (the Dispatcher protocol of app.runs.queue)."""

    def __init__(self, pool: RayPool, output_root: str | Path | None = None, poll_seconds: float = 1.0,
                 close_pool: bool = True, recover: bool = True):
        """``recover``: at start, settle the staging folders an earlier process left (off for a
        private, new store, whose runs cannot have left any: others' folders are not its own)."""
        self.pool = pool
        self.recover = recover
        self.output_root = Path(output_root) if output_root else None
        self.poll_seconds = poll_seconds
        self.close_pool = close_pool
        self._queue: RunQueue | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, WorkerSlot] = {}  # run id -> the worker running it
        self._threads: dict[str, threading.Thread] = {}
        self._user_cancelled: set[str] = set()
        self._lock = threading.Lock()
        pool.on_change(self.notify)

    @classmethod
    def from_engine(cls, engine, address: str, output_root: str | Path | None = None, device: str | None = None,
                    **pool_options) -> RayDispatcher:
        """A dispatcher over workers that mirror ``engine``'s registry (the server's engine)."""
        pool = RayPool.create(address, engine.registry, device=device, **pool_options)
        return cls(pool, output_root or getattr(engine, "output_dir", None))

    # -- Dispatcher protocol --------------------------------------------------------------------------
    def start(self, queue: RunQueue) -> None:
        self._queue = queue
        self._stopping.clear()
        if self.recover:
            outputs.recover(self._root(), queue.store)
        self._thread = threading.Thread(target=self._loop, name="ditgraph-ray-dispatch", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str) -> bool:
        with self._lock:
            slot = self._runs.get(run_id)
            if slot is None:
                return False
            self._user_cancelled.add(run_id)
        self.pool.cancel(slot, run_id)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching. Runs in progress are cancelled at their next step boundary and go back
        to the queue; then the workers are shut down (and Ray, when the pool started it)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            running = list(self._runs.items())
        for run_id, slot in running:
            self.pool.cancel(slot, run_id)
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.close_pool:
            self.pool.close()
            for thread in list(self._threads.values()):
                thread.join(2.0)

    def describe(self) -> dict:
        with self._lock:
            running = {run_id: slot.name for run_id, slot in self._runs.items()}
        return {**self.pool.describe(), "running": running}

    # -- the loop -------------------------------------------------------------------------------------
    def _next_queued(self) -> RunRecord | None:
        store = self._queue.store
        for record in store.active():
            if record.status == "queued":
                return store.get(record.id)
        return None

    def _loop(self) -> None:
        queue = self._queue
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                dispatched = self._dispatch_one(queue)
            except Exception:
                log.exception("ray dispatch failed")
                dispatched = False
            if not dispatched:
                self._wake.wait(self.poll_seconds)

    def _dispatch_one(self, queue: RunQueue) -> bool:
        idle = self.pool.idle()
        if not idle:
            return False
        upcoming = self._next_queued()
        if upcoming is None:
            return False
        slot = self.pool.choose(upcoming.workflow, upcoming.targets, idle)

        def register(record: RunRecord) -> None:
            with self._lock:
                self._runs[record.id] = slot
            slot.running = record.id

        record = queue.claim(slot.name, register)
        if record is None:
            return False
        thread = threading.Thread(target=self._execute, args=(record, slot), daemon=True,
                                  name=f"ditgraph-ray-run-{record.id}")
        self._threads[record.id] = thread
        thread.start()
        return True

    def _root(self) -> Path:
        return Path(self.output_root or paths.output_dir())

    @staticmethod
    def _subfolder(record: RunRecord) -> str:
        return record.output_subfolder or record.id

    def _execute(self, record: RunRecord, slot: WorkerSlot) -> None:
        queue = self._queue
        root, subfolder = self._root(), self._subfolder(record)
        outputs.reset(root, subfolder, record.id)  # what an earlier, unrecorded try of this run left
        # the worker writes into the staging folder; file paths in events are relative to the
        # staging root, which are the run folder's paths once published
        staging = outputs.staging_dir(root, subfolder)
        try:
            summary = self.pool.execute(slot, record.id, record.workflow, record.targets, staging,
                                        outputs.staging_root(root),
                                        on_event=lambda event: queue.publish(record.client_id, event))
        except WorkerLost as exc:
            self._lost(record, slot, str(exc), counts=exc.started)
            return
        except Exception as exc:
            log.exception("run %s failed on %s", record.id, slot.name)
            error = {"message": f"internal error: {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
            self._complete(record, "failed", error=error, worker=slot.name)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
            self._release(record, slot)
            return
        try:
            self._finish(record, slot, summary)
        finally:
            self._release(record, slot)

    def _complete(self, record: RunRecord, status: str, **fields) -> None:
        """Publish the run's staged files, then record its end (the order app.runs.outputs needs)."""
        outputs.publish(self._root(), self._subfolder(record))
        self._queue.complete(record, status, **fields)

    def _requeue(self, record: RunRecord, retry: bool = False) -> None:
        """Back to the queue; what this try staged is thrown away (the next try starts afresh)."""
        self._queue.store.requeue(record.id, retry=retry)
        outputs.discard(self._root(), self._subfolder(record))

    def _finish(self, record: RunRecord, slot: WorkerSlot, summary: dict) -> None:
        queue = self._queue
        status, error = summary["status"], summary.get("error")
        if status == "cancelled":
            if self._stopping.is_set() and record.id not in self._user_cancelled:
                self._requeue(record)  # interrupted by shutdown, not by a user: run it again later
                return
            error = {"message": "cancelled"}
        if "ui" not in summary:  # the worker could not run it at all (invalid there, internal error)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
        self._complete(record, status, ui=summary.get("ui") or {}, error=error, timings=summary.get("timings") or {},
                       reasons=summary.get("reasons") or {}, executed=summary.get("executed") or [],
                       cached=summary.get("cached") or [])

    def _lost(self, record: RunRecord, slot: WorkerSlot, reason: str, counts: bool = True) -> None:
        queue = self._queue
        with self._lock:
            self._runs.pop(record.id, None)
            self._threads.pop(record.id, None)
            user_cancelled = record.id in self._user_cancelled
            self._user_cancelled.discard(record.id)
        self.pool.replace(slot, reason)
        if user_cancelled:
            self._complete(record, "cancelled", error={"message": "cancelled (its worker died while stopping)"})
            queue.publish(record.client_id, {"type": "run_cancelled", "run_id": record.id, "node": None})
        elif self._stopping.is_set() or not counts:
            self._requeue(record)  # not the run's fault: it had not started there
        elif record.retries >= queue.max_retries:
            error = {"message": f"{reason}; the run was tried {record.retries + 1} times, not retrying it again"}
            self._complete(record, "failed", error=error)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
        else:
            self._requeue(record, retry=True)
            queue.publish(record.client_id, {"type": "run_retrying", "run_id": record.id, "worker": slot.name,
                                             "retry": record.retries + 1, "reason": reason})
            queue.publish(None, {"type": "queue", **_counts(queue.store)})
        self.notify()

    def _release(self, record: RunRecord, slot: WorkerSlot) -> None:
        with self._lock:
            self._runs.pop(record.id, None)
            self._threads.pop(record.id, None)
            self._user_cancelled.discard(record.id)
        with self.pool._cond:
            if slot.running == record.id:
                slot.running = None
        self.notify()


def _counts(store: RunStore) -> dict:
    counts = store.counts()
    return {"queued": counts.get("queued", 0), "running": counts.get("running", 0)}
