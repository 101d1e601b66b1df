"""What one run produces (RunResult) and carries while it runs (RunState)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.context import RunCancelled
from app.core.workflow import Workflow

Event = dict[str, Any]


class NodeFailed(Exception):
    """A node raised; the message names the node and says what went wrong."""

    def __init__(self, node_id: str, node_type: str, message: str, detail: str = ""):
        self.node_id, self.node_type, self.detail = node_id, node_type, detail
        super().__init__(f"node {node_id} ({node_type}) failed: {message}")


@dataclass
class RunResult:
    run_id: str
    status: str = "running"  # success | failed | cancelled
    outputs: dict[str, tuple] = field(default_factory=dict)  # target node id -> output values
    ui: dict[str, dict] = field(default_factory=dict)  # node id -> data for the UI (saved images, ...)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not needed: lazy branches nothing asked for
    reasons: dict[str, str] = field(default_factory=dict)  # node id -> why it ran or was a hit
    timings: dict[str, float] = field(default_factory=dict)
    error: dict | None = None
    duration: float = 0.0

    def output(self, node_id: str, name_or_index: int = 0) -> Any:
        return self.outputs[node_id][name_or_index]

    def raise_for_status(self) -> RunResult:
        if self.status == "failed":
            raise NodeFailed(self.error["node"], self.error["type"], self.error["message"], self.error.get("detail", ""))
        if self.status == "cancelled":
            raise RunCancelled(f"run {self.run_id} was cancelled")
        return self

    def summary(self) -> dict:
        return {"run_id": self.run_id, "status": self.status, "executed": self.executed, "cached": self.cached,
                "skipped": self.skipped,
                "ui": self.ui, "error": self.error, "duration": round(self.duration, 4), "reasons": self.reasons}


@dataclass
class RunState:
    """Everything one run shares between its nodes: the workflow, where results go, how to
    report, when to stop, and the values and keys computed so far."""

    workflow: Workflow
    result: RunResult
    scope: str  # names the workflow for explanations ("why did this node re-run")
    emit: Callable[[Event], None]
    cancel: threading.Event
    output_dir: Path
    document: dict  # the workflow as saved (embedded in images)
    values: dict[str, tuple] = field(default_factory=dict)  # node id -> outputs
    keys: dict[str, str] = field(default_factory=dict)  # node id -> cache key
    current: str | None = None  # the node being scheduled (named when a run is cancelled)

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise RunCancelled(f"run {self.result.run_id} cancelled")
