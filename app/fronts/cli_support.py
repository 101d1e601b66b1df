"""What every ``ditgraph`` command shares: exit codes, the usage error, output lines, the progress line.

UsageError lives here, not in app.fronts.cli: under ``python -m app.fronts.cli`` that module runs as
``__main__``, and a class defined there would be a different class from the one commands raise.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130
MAX_PROBLEM_LINES = 50  # a person reads the first ones; --json has them all


class UsageError(Exception):
    """Bad input from the user: printed as one line per message, exit code 2."""

    def __init__(self, *messages: str):
        self.messages = [m for m in messages if m]
        super().__init__("\n".join(self.messages))


def out(*parts: Any) -> None:
    """A line on stdout."""
    print(*parts, flush=True)


def err(message: str) -> None:
    """A line on stderr."""
    print(message, file=sys.stderr, flush=True)


def emit_json(obj: dict) -> None:
    """One JSON line on stdout (--json mode)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def exit_code(statuses: list[str], json_mode: bool) -> int:
    """The command's exit code for the final statuses of its runs (cancelled wins over failed)."""
    if "cancelled" in statuses:
        return EXIT_CANCELLED
    if "failed" in statuses:
        if len(statuses) > 1 and not json_mode:
            err(f"{statuses.count('failed')} of {len(statuses)} runs failed")
        return EXIT_FAILED
    return EXIT_OK


def capped(lines: list, limit: int = MAX_PROBLEM_LINES) -> list:
    """The first ``limit`` lines, then one saying how many more there are."""
    if len(lines) <= limit:
        return list(lines)
    return [*lines[:limit], f"... and {len(lines) - limit} more (--json lists them all)"]


def problem_text(where: str, problem) -> str:
    """``error: WHERE: node 3, input 'steps': reason`` (the severity leads)."""
    text = str(problem)
    severity, _, rest = text.partition(": ")
    return f"{severity}: {where}: {rest}"


def natural(text: str) -> tuple:
    """Sort key putting numeric node ids in numeric order."""
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


@dataclass
class _RunState:
    """What the progress line knows of one run."""

    label: str = ""
    total_nodes: int = 0
    done_nodes: int = 0
    node: str = ""


class ProgressLine:
    """One self-updating status line on stderr (only on a TTY): a run's nodes and its sampler's step bar.

    Several runs may share it (a Ray batch): each event names its run (``key``) and the line shows
    the run that sent the latest one, after ``prefix`` (the batch's counts). Events may arrive on
    other threads than the one that sets the prefix, hence the lock.
    """

    def __init__(self, stream, label: str = ""):
        self.stream = stream
        self.label = label
        self.prefix = ""
        self.runs: dict[Any, _RunState] = {}
        self.shown: Any = None  # the key of the run the line shows
        self.detail = ""
        self.last_draw = 0.0
        self.visible = False
        self._lock = threading.RLock()

    def __call__(self, event: dict, key: Any = None, label: str | None = None) -> None:
        """Take one engine event of run ``key`` (labelled ``label``, else the line's own label)."""
        kind = event.get("type")
        with self._lock:
            run = self.runs.setdefault(key, _RunState(self.label if label is None else label))
            if key != self.shown:
                self.shown, self.detail = key, ""
            if kind == "run_started":
                run.total_nodes, run.done_nodes = len(event.get("nodes") or []), 0
                self.draw("starting", force=True)
            elif kind == "node_started":
                run.node = f"{event.get('node')} {event.get('node_type', '')}".strip()
                self.draw("", force=True)
            elif kind in ("node_finished", "node_cached"):
                run.done_nodes += 1
                self.draw("", force=True)
            elif kind == "progress":
                step, total = event.get("step", 0), max(1, event.get("total") or 1)
                width = 24
                filled = int(width * step / total)
                eta = event.get("eta")
                # at most 10 redraws a second, but the first and the last step always show (a fast run
                # of a few steps would otherwise show no bar at all)
                self.draw(f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"
                          + (f" ETA {eta:.0f}s" if isinstance(eta, (int, float)) else ""), force=step in (1, total))
            elif kind in ("run_finished", "run_failed", "run_cancelled"):
                self.runs.pop(key, None)
                self.shown = None
                self.clear()

    def status(self, prefix: str) -> None:
        """Set the text before the run's state (a batch's counts) and redraw at most 10 times a second."""
        with self._lock:
            self.prefix = prefix
            self.draw(self.detail)

    def draw(self, detail: str, force: bool = False) -> None:
        with self._lock:
            self.detail = detail
            now = time.monotonic()
            if not force and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            run = self.runs.get(self.shown)
            parts = [self.prefix]
            if run is not None:
                parts += [f"{run.label}nodes {run.done_nodes}/{run.total_nodes}", run.node, detail]
            text = " ".join(part for part in parts if part)
            self.stream.write("\r\x1b[K" + text[:200])
            self.stream.flush()
            self.visible = True

    def clear(self) -> None:
        with self._lock:
            if self.visible:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.visible = False
