"""The SQLite run store: every run is one row (workflow, status, timestamps, outputs, error).

    store = RunStore("~/ditgraph/queue.sqlite3")      # WAL mode, survives restarts

Status moves queued -> running -> success | failed | cancelled. A run that was ``running``
when the process died is queued again by :meth:`RunStore.recover` on the next start (at most
``max_retries`` times, so a workflow that kills the process cannot loop forever).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FINISHED = ("success", "failed", "cancelled")
SCHEMA_VERSION = 1


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
    priority: int = 0  # queued runs run by priority (higher first), then in submission order
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
            "timings", "reasons", "executed", "cached", "retries", "output_subfolder", "worker", "name",
            "priority")
QUEUE_ORDER = "priority DESC, seq"  # the order queued runs are claimed in
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
                name TEXT,
                priority INTEGER NOT NULL DEFAULT 0)"""
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "name" not in columns:  # databases made before runs had a name column
            self._db.execute("ALTER TABLE runs ADD COLUMN name TEXT")
        if "priority" not in columns:  # ... or a priority
            self._db.execute("ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
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
                f"(SELECT seq FROM runs WHERE status='queued' ORDER BY {QUEUE_ORDER} LIMIT 1) AND status='queued' RETURNING *",
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
                f"SELECT {_LIST_COLUMNS} FROM runs WHERE status IN ('running', 'queued') ORDER BY status = 'queued', {QUEUE_ORDER}"
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
            row = self._db.execute("SELECT seq, status, priority FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM runs WHERE status='queued' AND (priority > ? OR (priority = ? AND seq < ?))",
                (row["priority"], row["priority"], row["seq"]),
            ).fetchone()[0]

    def move_to_front(self, run_id: str) -> bool:
        """Make a queued run the next to start (ahead of every other queued run); False if not queued."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE runs SET priority = (SELECT COALESCE(MAX(priority), 0) + 1 FROM runs WHERE status='queued') "
                "WHERE id = ? AND status='queued'", (run_id,))
        return cursor.rowcount == 1

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
