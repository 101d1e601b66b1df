"""Small test-only nodes that count their calls, for engine tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import torch

from app.context import current
from app.registry import NodeResult, node
from app.types import FLOAT, INT, LATENT, STRING, Spec

calls: Counter[str] = Counter()
order: list[str] = []


def _record() -> None:
    ctx = current()
    calls[ctx.node_id] += 1
    order.append(ctx.node_id)


@node(category="test", outputs={"value": INT})
def Const(value: Annotated[int, Spec(min=-1000, max=1000)] = 0) -> int:
    _record()
    return value


@node(category="test", outputs={"value": INT})
def Add(a: int = 0, b: int = 0) -> int:
    _record()
    return a + b


@node(category="test", outputs={"value": FLOAT})
def Scale(x: float = 1.0, mode: Annotated[str, Spec(choices=["double", "half"])] = "double") -> float:
    _record()
    return x * 2 if mode == "double" else x / 2


@node(category="test", outputs={}, output_node=True)
def Sink(value: INT) -> NodeResult:
    _record()
    return NodeResult((), {"value": [value]})


@node(category="test", outputs={"latent": LATENT})
def Blob(kilobytes: int = 1, seed: int = 0) -> torch.Tensor:
    """A tensor of a given size, to exercise byte accounting."""
    _record()
    return torch.full((kilobytes * 256,), float(seed), dtype=torch.float32)


@node(category="test", outputs={}, output_node=True)
def LatentSink(latent: LATENT) -> NodeResult:
    _record()
    return NodeResult((), {"sum": float(latent.sum())})


@node(category="test", outputs={"text": STRING})
def ReadText(path: Annotated[str, Spec(file="input")] = "") -> str:
    """Reads a text file from the input folder (fingerprinted by the engine)."""
    _record()
    return Path(path).read_text()


@node(category="test", outputs={}, output_node=True)
def TextSink(text: STRING) -> NodeResult:
    _record()
    return NodeResult((), {"text": [text]})


@node(category="test", outputs={"value": INT})
def Slow(value: int = 0, steps: int = 10) -> int:
    """Reports progress each step (a step boundary where cancellation is honoured)."""
    _record()
    ctx = current()
    for step in range(1, steps + 1):
        ctx.progress(step, steps)
    return value


@node(category="test", outputs={"value": INT})
def Fail(value: int = 0, message: str = "boom") -> int:
    _record()
    raise ValueError(message)


oom_failures = {"left": 0}


@node(category="test", outputs={"value": INT})
def OomOnce(value: int = 0) -> int:
    """Raises CUDA-style out-of-memory while ``oom_failures['left']`` > 0."""
    _record()
    if oom_failures["left"] > 0:
        oom_failures["left"] -= 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return value


@node(category="test", outputs={"value": INT})
def Increment(value: INT) -> int:
    """A node with a pure link input (bypassable: INT in, INT out)."""
    _record()
    return value + 1
