"""The persistent run queue: runs and their history in SQLite, dispatched to an engine.

    store = RunStore("~/ditgraph/queue.sqlite3")      # WAL mode, survives restarts
    queue = RunQueue(store, LocalDispatcher(engine))   # one worker thread, one engine
    queue.start()
    record = queue.submit(workflow_document, client_id="tab-1")
    queue.subscribe(lambda client_id, event: ...)      # engine + queue events, per run

Every run is one row: its workflow, status (queued -> running -> success | failed |
cancelled), timestamps, UI outputs, error, timings and retry count. A run that was
``running`` when the process died is queued again on the next start (at most
``max_retries`` times, so a workflow that kills the process cannot loop forever).
Each run writes its files into its own subfolder of the output folder (named by the run
id), so runs never overwrite each other's outputs.

Dispatch sits behind :class:`Dispatcher` (start / notify / cancel / stop): the local
implementation runs one engine in one thread; a pool of remote workers can implement the
same four methods and claim runs from the same store.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.core.workflow import Problem, Workflow, WorkflowError, errors

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("success", "failed", "cancelled")
SCHEMA_VERSION = 1

Listener = Callable[[str | None, dict], None]  # (client_id of the run's submitter, event)


def new_run_id() -> str:
    """Sortable, URL- and file-name-safe: ``20250101-120000-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class RunRecord:
    """One run as stored: what was asked, what happened."""

    id: str
    workflow: dict
    client_id: str | None = None
    targets: list[str] | None = None
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    ui: dict = field(default_factory=dict)
    error: dict | None = None
    timings: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)
    executed: list = field(default_factory=list)
    cached: list = field(default_factory=list)
    retries: int = 0
    output_subfolder: str | None = None
    worker: str | None = None
    name: str = ""
    seq: int | None = None

    def __post_init__(self) -> None:
        if not self.name and isinstance(self.workflow, dict):
            self.name = str((self.workflow.get("meta") or {}).get("name") or "untitled")

    def summary(self, with_workflow: bool = False) -> dict:
        """The JSON shape served by the API (``run_id`` rather than ``id``)."""
        data = asdict(self)
        data["run_id"] = data.pop("id")
        data.pop("seq", None)
        if not with_workflow:
            data.pop("workflow")
        duration = (self.finished - self.started) if self.finished and self.started else None
        data["duration"] = round(duration, 4) if duration is not None else None
        return data


_JSON_COLUMNS = ("workflow", "targets", "ui", "error", "timings", "reasons", "executed", "cached")
_COLUMNS = ("seq", "id", "client_id", "workflow", "targets", "status", "created", "started", "finished", "ui", "error",
            "timings", "reasons", "executed", "cached", "retries", "output_subfolder", "worker", "name")
# listings leave the (possibly large) workflow out
_LIST_COLUMNS = ", ".join(c for c in _COLUMNS if c != "workflow")


class QueueLocked(RuntimeError):
    """Another process already serves this queue database."""


class RunStore:
    """Runs and history in one SQLite file (WAL mode); safe to share between threads.

    ``exclusive=True`` takes an advisory lock next to the database so a second server
    process cannot serve (and requeue the runs of) the same queue.
    """

    def __init__(self, path: str | os.PathLike, exclusive: bool = False):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_file = None
        if exclusive:
            self._take_process_lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS runs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT UNIQUE NOT NULL,
                client_id TEXT,
                workflow TEXT NOT NULL,
                targets TEXT,
                status TEXT NOT NULL,
                created REAL NOT NULL,
                started REAL,
                finished REAL,
                ui TEXT, error TEXT, timings TEXT, reasons TEXT, executed TEXT, cached TEXT,
                retries INTEGER NOT NULL DEFAULT 0,
                output_subfolder TEXT,
                worker TEXT,
                name TEXT)"""
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "name" not in columns:  # databases made before runs had a name column
            self._db.execute("ALTER TABLE runs ADD COLUMN name TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_by_finished ON runs(finished)")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _take_process_lock(self) -> None:
        import fcntl

        handle = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115 - held for the process life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise QueueLocked(f"another ditgraph server is already using the queue {self.path}; "
                              "stop it or pass a different --db") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    # -- rows ------------------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        for name in _JSON_COLUMNS:
            if data.get(name) is not None:
                data[name] = json.loads(data[name])
        for name, empty in (("ui", {}), ("timings", {}), ("reasons", {}), ("executed", []), ("cached", []), ("workflow", {})):
            if data.get(name) is None:
                data[name] = type(empty)()
        data["name"] = data.get("name") or ""
        return RunRecord(**data)

    @staticmethod
    def _dump(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False, default=str)

    def add(self, record: RunRecord) -> RunRecord:
        values = {name: getattr(record, name) for name in _COLUMNS if name != "seq"}
        for name in _JSON_COLUMNS:
            values[name] = self._dump(values[name])
        with self._lock:
            cursor = self._db.execute(
                f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", tuple(values.values())
            )
            record.seq = cursor.lastrowid
        return record

    def get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def claim_next(self, worker: str) -> RunRecord | None:
        """Atomically move the oldest queued run to ``running`` and return it."""
        with self._lock:
            row = self._db.execute(
                "UPDATE runs SET status='running', started=?, worker=? WHERE seq = "
                "(SELECT seq FROM runs WHERE status='queued' ORDER BY seq LIMIT 1) AND status='queued' RETURNING *",
                (time.time(), worker),
            ).fetchone()
        return self._record(row) if row else None

    def finish(self, run_id: str, status: str, **fields: Any) -> bool:
        """Record the outcome of a running run; False if it was not running."""
        assert status in FINISHED
        sets = {"status": status, "finished": time.time()}
        for name, value in fields.items():
            sets[name] = self._dump(value) if name in _JSON_COLUMNS else value
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ? AND status = 'running'",
                (*sets.values(), run_id),
            )
        return cursor.rowcount == 1

    def requeue(self, run_id: str, retry: bool = False) -> bool:
        """Put a running run back in the queue, keeping its place (the server stopped under it;
        with ``retry``, its worker died under it: that counts as one more try in ``retries``)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE runs SET status='queued', started=NULL, worker=NULL, retries=retries+? "
                "WHERE id = ? AND status='running'", (int(retry), run_id)
            )
        return cursor.rowcount == 1

    def cancel_queued(self, run_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE runs SET status='cancelled', finished=?, error=? WHERE id = ? AND status='queued'",
                (time.time(), self._dump({"message": "cancelled before it started"}), run_id),
            )
        return cursor.rowcount == 1

    def cancel_all_queued(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "UPDATE runs SET status='cancelled', finished=?, error=? WHERE status='queued' RETURNING id",
                (time.time(), self._dump({"message": "cancelled before it started"})),
            ).fetchall()
        return [row["id"] for row in rows]

    def recover(self, max_retries: int) -> tuple[list[str], list[str]]:
        """After a crash: queue again the runs left ``running``; fail those retried too often.

        Returns (requeued ids, failed ids).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                failed = [row["id"] for row in self._db.execute(
                    "UPDATE runs SET status='failed', finished=?, error=? WHERE status='running' AND retries >= ? RETURNING id",
                    (time.time(), self._dump({"message": f"the server stopped during this run {max_retries + 1} times; "
                                                         "not retrying it again"}), max_retries),
                ).fetchall()]
                requeued = [row["id"] for row in self._db.execute(
                    "UPDATE runs SET status='queued', started=NULL, worker=NULL, retries=retries+1 "
                    "WHERE status='running' RETURNING id"
                ).fetchall()]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return requeued, failed

    def active(self) -> list[RunRecord]:
        """Running runs first, then queued ones in the order they will run."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_LIST_COLUMNS} FROM runs WHERE status IN ('running', 'queued') ORDER BY status = 'queued', seq"
            ).fetchall()
        return [self._record(row) for row in rows]

    def history(self, limit: int = 50, offset: int = 0, status: str | None = None) -> tuple[list[RunRecord], int]:
        """Finished runs, newest first, and how many there are in all."""
        where, args = "status IN ('success', 'failed', 'cancelled')", []
        if status:
            where, args = "status = ?", [status]
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM runs WHERE {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {_LIST_COLUMNS} FROM runs WHERE {where} ORDER BY finished DESC, seq DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return [self._record(row) for row in rows], total

    def position(self, run_id: str) -> int | None:
        """How many queued runs are ahead of a queued run (0: it runs next); None if not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM runs WHERE status='queued' AND seq < ?", (row["seq"],)
            ).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status").fetchall()
        return {row["status"]: row["n"] for row in rows}

    def delete(self, run_id: str) -> bool:
        """Forget one finished run (the history's delete)."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM runs WHERE id = ? AND status IN ('success', 'failed', 'cancelled')",
                                      (run_id,))
        return cursor.rowcount == 1

    def prune(self, keep: int) -> int:
        """Drop the oldest finished runs beyond ``keep``."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM runs WHERE status IN ('success', 'failed', 'cancelled') AND seq NOT IN "
                "(SELECT seq FROM runs WHERE status IN ('success', 'failed', 'cancelled') ORDER BY seq DESC LIMIT ?)",
                (keep,),
            )
        return cursor.rowcount


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
    def submit(self, document: Any, client_id: str | None = None, targets: list[str] | None = None) -> RunRecord:
        """Validate and queue a workflow; raises WorkflowError (nothing queued) if invalid."""
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
        from app.core import paths

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


# -- output files named by UI data ---------------------------------------------------------------


def temp_root() -> Path:
    """Where preview nodes write (UI entries of type "temp"): $DITGRAPH_TEMP or <outputs>/../temp."""
    from app.core import paths

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
    from app.core import paths

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
