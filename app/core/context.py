"""What a running node can ask of the engine: progress, cancellation, device, output folder.

Node functions stay pure in their signature; they reach the run through
:func:`current` (a context variable the executor sets around each node call).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class RunCancelled(Exception):
    """Raised at a step boundary when the run was cancelled."""


@dataclass
class RunContext:
    run_id: str
    node_id: str
    node_type: str
    device: torch.device
    output_dir: Path
    workflow: dict  # the workflow document being run (embedded in saved images)
    emit: Callable[[dict], None]
    cancel_event: threading.Event
    # when the node is mapped over a list (app/core/lists.py): this call's element and the count
    list_index: int | None = None
    list_size: int | None = None
    # the VRAM budget as plain data: {"vram": bytes, "reserve": bytes, "make_room": memo spill fn}
    memory: dict = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise RunCancelled(f"run {self.run_id} cancelled")

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        """Report ``step`` of ``total`` (a step boundary: cancellation is checked here).

        ``preview`` is an optional small image (PIL or uint8 array) shown on the node.
        """
        self.check_cancelled()
        elapsed = time.perf_counter() - self._started
        eta = elapsed / step * (total - step) if step else None
        event = {"type": "progress", "run_id": self.run_id, "node": self.node_id, "step": step, "total": total, "eta": eta}
        if preview is not None:
            event["preview"] = preview
        self.emit(event)


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("ditgraph_run_context", default=None)


def current() -> RunContext:
    """The context of the node being executed; a detached default outside a run."""
    ctx = _current.get()
    if ctx is None:
        ctx = RunContext("detached", "-", "-", torch.device("cpu"), Path.cwd(), {}, lambda e: None, threading.Event())
    return ctx


def set_current(ctx: RunContext | None) -> contextvars.Token:
    return _current.set(ctx)


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)
