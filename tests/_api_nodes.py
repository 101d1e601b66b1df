"""Cheap test-only nodes for the CLI, server and queue tests (loaded with ``--plugin``).

They stand in for real diffusion nodes: ``SlowCount`` reports step progress with a tiny
preview image and checks cancellation, ``SaveText`` writes numbered files into the run's
output folder like SaveImage does, ``Fail`` raises.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np

from app.context import current
from app.registry import NodeResult, node
from app.types import INT, STRING, Spec


@node(category="test", outputs={"value": INT})
def SlowCount(
    steps: Annotated[int, Spec(min=0, max=10000)] = 3,
    delay: Annotated[float, Spec(min=0.0, max=5.0)] = 0.0,
    start: int = 0,
) -> int:
    """Counts ``steps`` steps, sleeping ``delay`` seconds each, reporting progress."""
    ctx = current()
    for step in range(1, steps + 1):
        time.sleep(delay)
        preview = np.full((8, 8, 3), (step * 40) % 256, dtype=np.uint8)
        ctx.progress(step, steps, preview=preview)
    return start + steps


@node(category="test", outputs={"path": STRING}, output_node=True)
def SaveText(text: STRING, prefix: str = "text", extra: str = "") -> NodeResult:
    """Writes ``text`` to ``<prefix>_00001.txt`` (numbered, never overwriting) in the run's folder."""
    ctx = current()
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    number = 1
    while (ctx.output_dir / f"{prefix}_{number:05d}.txt").exists():
        number += 1
    target = ctx.output_dir / f"{prefix}_{number:05d}.txt"
    target.write_text(str(text) + extra, encoding="utf-8")
    return NodeResult((str(target),), {"files": [{"filename": target.name, "subfolder": "", "type": "output"}]})


@node(category="test", outputs={"text": STRING})
def IntToText(value: INT) -> str:
    """Formats an integer."""
    return str(value)


@node(category="test", outputs={"value": INT})
def Fail(message: str = "boom", value: int = 0) -> int:
    """Always raises."""
    raise RuntimeError(message)
