"""Core nodes: constants, seeds, notes, reroutes and a generic preview."""

from __future__ import annotations

from typing import Annotated, Any

from app.core import vocabulary as vocab
from app.core.registry import NodeResult, node
from app.core.types import ANY, BOOLEAN, FLOAT, INT, STRING, Spec


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
