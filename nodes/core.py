"""Core nodes: constants, seeds, notes, reroutes, a generic preview, flow control (lazy
branches), list sweeps and repetition."""

from __future__ import annotations

import time
from typing import Annotated, Any

from app.core import vocabulary as vocab
from app.core.registry import Expansion, NodeResult, node
from app.core.types import ANY, BOOLEAN, FLOAT, INT, STRING, ListOf, Spec


@node(category="core/primitives", outputs={"value": INT})
def PrimitiveInt(value: int = 0) -> int:
    """A constant integer; link it to any integer widget."""
    return value


@node(category="core/primitives", outputs={"value": FLOAT})
def PrimitiveFloat(value: float = 0.0) -> float:
    """A constant number; link it to any number widget."""
    return float(value)


@node(category="core/primitives", outputs={"value": STRING})
def PrimitiveString(value: Annotated[str, Spec(multiline=True)] = "") -> str:
    """A constant text; link it to any text widget (e.g. one prompt shared by two encoders)."""
    return value


@node(category="core/primitives", outputs={"value": BOOLEAN})
def PrimitiveBoolean(value: bool = False) -> bool:
    """A constant true/false."""
    return value


@node(category="core/primitives", outputs={"seed": INT})
def Seed(seed: vocab.SEED = 0) -> int:
    """A seed shared by several nodes; the editor can randomize it before each run."""
    return seed


@node(category="core/primitives", outputs={"value": INT})
def MathInt(
    a: int = 0,
    b: int = 0,
    operation: Annotated[str, Spec(choices=["add", "subtract", "multiply", "min", "max"])] = "add",
) -> int:
    """Integer arithmetic, e.g. derive a second seed from the first."""
    return {"add": a + b, "subtract": a - b, "multiply": a * b, "min": min(a, b), "max": max(a, b)}[operation]


@node(category="core/utility", outputs={"value": ANY})
def Reroute(value: Any) -> Any:
    """Passes its input through unchanged: tidies long wires."""
    return value


@node(category="core/utility", outputs={}, passive=True)
def Note(text: Annotated[str, Spec(multiline=True)] = "") -> None:
    """A note on the canvas; it never runs."""


@node(category="core/utility", outputs={}, output_node=True)
def PreviewAny(value: Any) -> NodeResult:
    """Shows any value as text on the node (shapes for tensors)."""
    return NodeResult((), {"text": [describe(value)]})


def describe(value: Any) -> str:
    """A short human description of a value: tensors by shape/dtype/device, others by repr."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__}{tuple(shape)} {value.dtype} on {getattr(value, 'device', 'cpu')}"
    text = repr(value)
    return text if len(text) <= 2000 else text[:1997] + "..."


# -- flow control: lazy inputs, so only the branch that is used runs ------------------------------

Branch = Annotated[Any, Spec(lazy=True, tooltip="Runs only if chosen.")]
CHOICES = ("input_0", "input_1", "input_2", "input_3")


@node(category="core/flow", outputs={"value": ANY}, needs=lambda condition, **_: ["if_true" if condition else "if_false"])
def If(condition: bool = False, if_true: Branch = None, if_false: Branch = None) -> Any:
    """Pass on ``if_true`` or ``if_false``; the other branch is not run."""
    return if_true if condition else if_false


@node(category="core/flow", outputs={"value": ANY}, needs=lambda select, **_: [CHOICES[select]])
def Switch(
    select: Annotated[int, Spec(min=0, max=3, tooltip="Which input to pass on.")] = 0,
    input_0: Branch = None,
    input_1: Branch = None,
    input_2: Branch = None,
    input_3: Branch = None,
) -> Any:
    """Pass on one of four inputs; the others are not run."""
    return (input_0, input_1, input_2, input_3)[select]


def _first_available_needs(**values: Any) -> list[str]:
    for name in CHOICES:
        if name not in values:
            return [name]  # not evaluated yet: ask for it
        if values[name] is not None:
            return []
    return []


@node(category="core/flow", outputs={"value": ANY}, needs=_first_available_needs)
def SelectFirstAvailable(
    input_0: Branch = None,
    input_1: Branch = None,
    input_2: Branch = None,
    input_3: Branch = None,
) -> Any:
    """Pass on the first input that is connected and not empty, evaluating them in order (the
    rest are not run)."""
    for value in (input_0, input_1, input_2, input_3):
        if value is not None:
            return value
    raise ValueError("none of the inputs is connected and available")


# -- lists: a list output runs what it feeds once per element (app/core/lists.py) ------------------


@node(category="core/lists", outputs={"seed": ListOf(INT)})
def SeedList(
    start: vocab.SEED = 0,
    count: Annotated[int, Spec(min=1, max=4096)] = 4,
    step: Annotated[int, Spec(min=1, max=2**32)] = 1,
) -> list[int]:
    """A seed sweep: ``count`` seeds from ``start``; what it feeds runs once per seed."""
    return [(start + i * step) % (vocab.SEED_MAX + 1) for i in range(count)]


@node(category="core/lists", outputs={"text": ListOf(STRING)})
def StringList(text: Annotated[str, Spec(multiline=True, tooltip="One item (e.g. a prompt) per line.")] = "") -> list[str]:
    """A prompt (or any text) sweep: one item per non-empty line; what it feeds runs once per item."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- expansion and non-idempotent nodes ------------------------------------------------------------


@node(category="core/flow", outputs={"value": ANY})
def Repeat(
    value: Any,
    node_type: Annotated[str, Spec(tooltip="The node type applied each time (one input, one output).")],
    times: Annotated[int, Spec(min=1, max=1000)] = 2,
    input_name: Annotated[str, Spec(tooltip="The input of node_type that receives the value.")] = "value",
    output_name: Annotated[str, Spec(tooltip="The output of node_type passed on.")] = "value",
) -> Expansion:
    """Apply a node ``times`` times in a chain (``value`` -> node -> node ...). The chain runs as
    ordinary nodes (``<id>/1``, ``<id>/2`` ...), each memoized."""
    nodes = {}
    for step in range(1, times + 1):
        source = ["@in", "value"] if step == 1 else [str(step - 1), output_name]
        nodes[str(step)] = {"type": node_type, "inputs": {input_name: {"from": source}}}
    return Expansion(nodes, {"value": [str(times), output_name]})


@node(category="core/utility", outputs={"text": STRING}, always_run=True)
def CurrentTime(format: Annotated[str, Spec(tooltip="strftime format, e.g. %Y-%m-%d")] = "%Y-%m-%d %H:%M:%S") -> str:
    """The local time as text (runs on every run: e.g. for dated file names)."""
    return time.strftime(format)
