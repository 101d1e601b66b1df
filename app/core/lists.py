"""List semantics: a node fed lists runs once per element.

A value produced by a ``ListOf`` output (or by a node that was mapped) is a :class:`ValueList`.
When such values reach inputs not declared ``Spec(whole_list=True)``, the node is called once
per element, **zipping** the lists; a list of length 1 (and any plain value) is **broadcast**
to every call. Lists of different lengths > 1 are an error naming both lengths. Each output of
a mapped node is a ValueList of the per-call results (a ``ListOf`` output's lists are
concatenated); ``ui`` data is merged key by key. A ``whole_list`` input always receives a
Python list (a plain value arrives as a list of one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.core.registry import NodeDef


class ValueList(list):
    """A list the engine maps consumers over (as opposed to a list that is one value)."""


def mapped_length(nd: NodeDef, kwargs: dict[str, Any]) -> int | None:
    """How many calls ``kwargs`` ask for (None: a single, unmapped call)."""
    lengths = {name: len(v) for name, v in kwargs.items()
               if isinstance(v, ValueList) and not nd.inputs[name].spec.whole_list and len(v) != 1}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name!r} has {n}" for name, n in lengths.items())
        raise ValueError(f"cannot zip lists of different lengths ({shown}); use lists of one length or of length 1")
    if lengths:
        return next(iter(lengths.values()))
    if any(isinstance(v, ValueList) and not nd.inputs[n].spec.whole_list for n, v in kwargs.items()):
        return 1  # only length-1 lists: one call, still a list out
    return None


def element_kwargs(nd: NodeDef, kwargs: dict[str, Any], index: int | None) -> dict[str, Any]:
    """The arguments of call ``index`` (None: the unmapped call)."""
    out = {}
    for name, value in kwargs.items():
        if nd.inputs[name].spec.whole_list:
            out[name] = list(value) if isinstance(value, list) else [value]
        elif isinstance(value, ValueList) and index is not None:
            out[name] = value[index if len(value) > 1 else 0]
        else:
            out[name] = value
    return out


def wrap_outputs(nd: NodeDef, outputs: tuple) -> tuple:
    """Mark ``ListOf`` outputs of one call as ValueLists."""
    return tuple(ValueList(v) if out.is_list else v for out, v in zip(nd.outputs, outputs, strict=True))


def map_calls(nd: NodeDef, kwargs: dict, call: Callable[[dict, int | None], tuple[tuple, dict | None]]) -> tuple[tuple, dict | None]:
    """Call ``call(element kwargs, index)`` once, or once per list element, and combine."""
    if not nd.whole_list_inputs and not any(type(v) is ValueList for v in kwargs.values()):
        outputs, ui = call(kwargs, None)  # the common case: no lists involved
        return (wrap_outputs(nd, outputs) if nd.has_list_outputs and isinstance(outputs, tuple) else outputs), ui
    count = mapped_length(nd, kwargs)
    if count is None:
        outputs, ui = call(element_kwargs(nd, kwargs, None), None)
        return (wrap_outputs(nd, outputs) if isinstance(outputs, tuple) else outputs), ui  # or an expansion
    results = [call(element_kwargs(nd, kwargs, i), i) for i in range(count)]
    return combine(nd, results)


def combine(nd: NodeDef, results: list[tuple[tuple, dict | None]]) -> tuple[tuple, dict | None]:
    """Per-call (outputs, ui) pairs as one mapped result."""
    outputs = []
    for position, out in enumerate(nd.outputs):
        values = ValueList()
        for result_outputs, _ in results:
            value = result_outputs[position]
            values.extend(value) if out.is_list else values.append(value)
        outputs.append(values)
    uis = [ui for _, ui in results if ui]
    merged: dict | None = None
    if uis:
        merged = {}
        for ui in uis:
            for key, value in ui.items():
                merged.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return tuple(outputs), merged
