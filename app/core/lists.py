"""List semantics: a node fed lists runs once per element, each element memoized on its own.

A value produced by a ``ListOf`` output (or by a node that was mapped) is a :class:`ValueList`.
When such values reach inputs not declared ``Spec(whole_list=True)``, the node is called once
per element, **zipping** the lists; a list of length 1 (and any plain value) is **broadcast**
to every call. Lists of different lengths > 1 are an error naming both lengths. Each output of
a mapped node is a ValueList of the per-call results (a ``ListOf`` output's lists are
concatenated); ``ui`` data is merged key by key. A ``whole_list`` input always receives a
Python list (a plain value arrives as a list of one).

Every element carries a key: a scalar element (a seed, a prompt) is keyed by its value, other
elements by where they came from. A mapped call is memoized under its node key with the mapped
inputs' element keys in place of the whole lists' keys, so growing a seed list from 4 to 5
runs one new element, not five.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core.keys import canonical
from app.core.registry import NodeDef

_SCALARS = (int, float, str, bool, type(None))


class ValueList(list):
    """A list the engine maps consumers over (as opposed to a list that is one value);
    ``keys`` identify its elements for per-element memoization."""

    keys: list[str] | None = None


def digest(value: Any) -> str:
    return hashlib.blake2b(canonical(value).encode(), digest_size=16).hexdigest()


def labelled(values: list, keys: list[str]) -> ValueList:
    out = ValueList(values)
    out.keys = keys
    return out


def mapped_length(nd: NodeDef, kwargs: dict[str, Any]) -> int | None:
    """How many calls ``kwargs`` ask for (None: a single, unmapped call). Raises ValueError
    naming the lengths of lists that do not zip."""
    if not nd.whole_list_inputs and not any(type(v) is ValueList for v in kwargs.values()):
        return None  # the common case: no lists involved
    lengths = {name: len(v) for name, v in kwargs.items()
               if isinstance(v, ValueList) and name not in nd.whole_list_inputs and len(v) != 1}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name!r} has {n}" for name, n in lengths.items())
        raise ValueError(f"cannot zip lists of different lengths ({shown}); use lists of one length or of length 1")
    if lengths:
        return next(iter(lengths.values()))
    if any(isinstance(v, ValueList) and n not in nd.whole_list_inputs for n, v in kwargs.items()):
        return 1  # only length-1 lists: one call, still a list out
    return None


def element_kwargs(nd: NodeDef, kwargs: dict[str, Any], index: int | None) -> dict[str, Any]:
    """The arguments of call ``index`` (None: the unmapped call)."""
    out = {}
    for name, value in kwargs.items():
        if name in nd.whole_list_inputs:
            out[name] = list(value) if isinstance(value, list) else [value]
        elif isinstance(value, ValueList) and index is not None:
            out[name] = value[index if len(value) > 1 else 0]
        else:
            out[name] = value
    return out


def element_keys(nd: NodeDef, kwargs: dict[str, Any], parts: dict, count: int) -> list[str]:
    """The memo key of each mapped call: the node's key parts with every mapped input's link
    replaced by the key of the element that call receives."""
    mapped = {name: v for name, v in kwargs.items() if isinstance(v, ValueList) and name not in nd.whole_list_inputs}
    keys = []
    for index in range(count):
        links = dict(parts["links"])
        for name, values in mapped.items():
            position = index if len(values) > 1 else 0
            links[name] = values.keys[position] if values.keys else f"{links.get(name)}#{position}"
        keys.append(digest({**parts, "links": links, "element": True}))
    return keys


def label_outputs(nd: NodeDef, outputs: tuple, origin: str) -> tuple:
    """Mark the ``ListOf`` outputs of one unmapped call as ValueLists with element keys: a
    scalar element is keyed by its value (the same seed is the same element wherever it comes
    from), any other by ``origin`` (the node's key), output and position."""
    if not nd.has_list_outputs:
        return outputs
    labelled_outputs = []
    for out, value in zip(nd.outputs, outputs, strict=True):
        if out.is_list:
            value = labelled(list(value), [digest(["value", v]) if isinstance(v, _SCALARS) else f"{origin}:{out.name}:{j}"
                                           for j, v in enumerate(value)])
        labelled_outputs.append(value)
    return tuple(labelled_outputs)


def combine(nd: NodeDef, results: list[tuple[tuple, dict | None]], keys: list[str]) -> tuple[tuple, dict | None]:
    """Per-call (outputs, ui) pairs, with the calls' element keys, as one mapped result."""
    outputs = []
    for position, out in enumerate(nd.outputs):
        values, value_keys = [], []
        for (call_outputs, _), key in zip(results, keys, strict=True):
            value = call_outputs[position]
            if out.is_list:
                values.extend(value)
                value_keys.extend(f"{key}:{out.name}:{j}" for j in range(len(value)))
            else:
                values.append(value)
                value_keys.append(f"{key}:{out.name}")
        outputs.append(labelled(values, value_keys))
    merged: dict | None = None
    for _, ui in results:
        for key, value in (ui or {}).items():
            merged = merged if merged is not None else {}
            merged.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return tuple(outputs), merged


@dataclass(frozen=True)
class Manifest:
    """What the memo cache holds under a mapped node's own key: the keys of its elements (each
    memoized on its own), so nothing is stored twice."""

    keys: tuple[str, ...]


def from_manifest(nd: NodeDef, manifest: Manifest, lookup: Callable[[str], Any]) -> tuple[tuple, dict | None] | None:
    """A mapped node's (outputs, ui) rebuilt from its element entries; None if one is gone."""
    results = []
    for key in manifest.keys:
        entry = lookup(key)
        if entry is None:
            return None
        results.append((entry.outputs, entry.ui))
    return combine(nd, results, list(manifest.keys))
