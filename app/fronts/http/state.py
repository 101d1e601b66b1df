"""The state one server process holds: the engine, the run queue and the websocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core import paths
from app.fronts.http.settings import Settings
from app.runs.events import jsonable_event
from app.runs.local import LocalDispatcher
from app.runs.queue import RunQueue
from app.runs.store import RunStore


@dataclass(eq=False)
class Connection:
    client_id: str
    all_runs: bool
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue

    def offer(self, text: str, droppable: bool) -> None:
        if self.outbox.full():
            if droppable:
                return  # a slow client loses progress ticks, never lifecycle events
            with contextlib.suppress(asyncio.QueueEmpty):
                self.outbox.get_nowait()
        self.outbox.put_nowait(text)


class AppState:
    """The engine, the run queue and the websocket clients of one server."""

    def __init__(self, engine: Any, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.store: RunStore | None = None
        self.queue: RunQueue | None = None
        self.connections: set[Connection] = set()
        self._connections_lock = threading.Lock()
        self.started_at = time.time()

    @property
    def registry(self):
        return self.engine.registry

    def output_root(self) -> Path:
        return Path(self.engine.output_dir or paths.output_dir())

    def start(self) -> None:
        if self.queue is not None:
            return
        self.store = RunStore(self.settings.db_path, exclusive=True)
        if self.settings.ray:
            from app.runs.ray_dispatch import RayDispatcher  # Ray is imported only in this mode

            dispatcher = RayDispatcher.from_engine(self.engine, self.settings.ray, self.output_root(),
                                                   device=self.settings.ray_device,
                                                   engine_options=self.settings.ray_engine)
        else:
            dispatcher = LocalDispatcher(self.engine, self.output_root())
        self.queue = RunQueue(self.store, dispatcher, self.engine.validate,
                              max_retries=self.settings.max_retries, keep_history=self.settings.keep_history)
        self.queue.subscribe(self._on_event)
        self.queue.start()

    def run_queue(self) -> RunQueue:
        """The run queue, started lazily when the app runs without the startup hook (tests)."""
        if self.queue is None:
            self.start()
        return self.queue

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop(timeout=10)
        if self.store is not None:
            self.store.close()
        self.queue = self.store = None

    def add_connection(self, connection: Connection) -> None:
        with self._connections_lock:
            self.connections.add(connection)

    def remove_connection(self, connection: Connection) -> None:
        with self._connections_lock:
            self.connections.discard(connection)

    def _on_event(self, client_id: str | None, event: dict) -> None:
        """Called from the worker thread: fan the event out to the clients that may see it."""
        with self._connections_lock:
            connections = list(self.connections)
        if not connections:
            return
        broadcast = event.get("type") == "queue"
        targets = [c for c in connections if broadcast or c.all_runs or (client_id is not None and c.client_id == client_id)]
        if not targets:
            return
        data = jsonable_event(event)
        if isinstance(data.get("error"), dict):
            data["error"] = {k: v for k, v in data["error"].items() if k != "detail"}  # tracebacks stay in the record
        text = json.dumps(data, ensure_ascii=False)
        droppable = event.get("type") == "progress"
        for connection in targets:
            with contextlib.suppress(RuntimeError):  # loop closed while shutting down
                connection.loop.call_soon_threadsafe(connection.offer, text, droppable)
