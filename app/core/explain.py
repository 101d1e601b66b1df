"""Keys and explanations without running: which nodes would be cache hits, which re-run and
why, which are not needed (a lazy branch nobody asks for), and what nodes with an ``estimate``
hook would need (a loader's VRAM plan).

A lazy node's key covers only the lazy inputs it evaluates, so predicting it means asking its
``needs`` function; that is possible when the values it looks at are constants or already in
the memo cache (peeked, not touched). Otherwise the choice is made at run time and said so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core import paths
from app.core.keys import NodeKey, node_key
from app.core.lists import Manifest, from_manifest
from app.core.registry import NodeDef
from app.core.scheduler import wanted_lazy
from app.core.workflow import Connection, NodeInstance, Workflow

if TYPE_CHECKING:
    from app.core.executor import Engine

_UNKNOWN = object()


def static_keys(engine: Engine, flat: Workflow, targets: list[str]) -> tuple[dict[str, NodeKey], dict[str, str]]:
    """(keys of the nodes whose key is known before running, notes on the others), over the
    nodes ``targets`` may need, in run order. Notes say "not needed" or why the key is unknown."""
    found: dict[str, NodeKey] = {}
    notes: dict[str, str] = {}
    chosen: dict[str, set[str] | None] = {}  # lazy node -> lazy inputs it evaluates (None: decided at run time)
    order = flat.execution_order(targets)
    for node_id in order:
        inst = flat.nodes[node_id]
        nd = engine.registry.get(inst.type)
        inputs = inst.inputs
        if nd.lazy_inputs and not inst.bypass:
            chosen[node_id] = _predict_needs(engine, inst, nd, found)
            if chosen[node_id] is None:
                notes[node_id] = "decides at run time which lazy inputs it needs"
                continue
            inputs = {n: v for n, v in inst.inputs.items() if n not in nd.lazy_inputs or n in chosen[node_id]}
        if any(isinstance(c, Connection) and c.node not in found for c in inputs.values()):
            notes[node_id] = "depends on a node whose key is known only at run time"
            continue
        try:
            found[node_id] = node_key(nd, inputs, {n: k.key for n, k in found.items()}, engine.salt, inst.bypass,
                                      "explain" if nd.always_run else None)
        except paths.PathRefused as exc:
            notes[node_id] = str(exc)
    needed = _needed(engine, flat, targets, chosen)
    notes.update((n, "not needed") for n in order if n not in needed)
    return {n: k for n, k in found.items() if n in needed}, notes


def estimates(engine: Engine, found: dict[str, NodeKey], device: Any, memory: dict | None = None) -> dict[str, dict]:
    """Node id -> what its ``estimate`` hook says, for the nodes of ``found`` that have one and
    whose inputs are all constants, under ``memory`` (default: the engine's budget). An
    estimate is advice: its failure is reported, not raised."""
    report: dict[str, dict] = {}
    for node_id, key in found.items():
        nd = engine.registry.get(key.parts["type"])
        if nd.estimate is None or key.parts["bypass"]:
            continue
        if key.parts["links"]:
            report[node_id] = {"lines": ["estimated when it runs (an input comes from another node)"]}
            continue
        values = {**key.constants, **{name: str(path) for name, path in key.files.items()}}
        try:
            report[node_id] = nd.estimate(values, engine.memory if memory is None else memory, device)
        except Exception as exc:
            report[node_id] = {"error": str(exc), "lines": [f"cannot estimate: {exc}"]}
    return report


def _predict_needs(engine: Engine, inst: NodeInstance, nd: NodeDef, found: dict[str, NodeKey]) -> set[str] | None:
    """The lazy inputs ``inst`` would evaluate, if knowable from constants and cached values."""
    lazy, evaluated = nd.lazy_inputs, set()
    while True:
        values: dict[str, Any] = {}
        for name, decl in nd.inputs.items():
            if name in lazy and name not in evaluated:
                continue
            value = inst.inputs.get(name, decl.default)
            values[name] = _peek(engine, value, found) if isinstance(value, Connection) else value
            if values[name] is _UNKNOWN:
                return None
        new = wanted_lazy(nd, inst, values, evaluated)
        if not new:
            return evaluated
        evaluated |= new


def cached_outputs(engine: Engine, nd: NodeDef, key: str) -> tuple | None:
    """A node's memoized outputs, without touching the cache's recency (None: not cached)."""
    entry = engine.cache.peek(key)
    if entry is not None and isinstance(entry.outputs, Manifest):
        rebuilt = from_manifest(nd, entry.outputs, engine.cache.peek)
        return rebuilt[0] if rebuilt is not None else None
    return entry.outputs if entry is not None else None


def _peek(engine: Engine, connection: Connection, found: dict[str, NodeKey]) -> Any:
    key = found.get(connection.node)
    source = engine.registry.get(key.parts["type"]) if key is not None else None
    outputs = cached_outputs(engine, source, key.key) if key is not None else None
    return _UNKNOWN if outputs is None else outputs[source.output_index[connection.output]]


def _needed(engine: Engine, flat: Workflow, targets: list[str], chosen: dict[str, set[str] | None]) -> set[str]:
    """What ``targets`` need, following a lazy node's lazy inputs only where it would evaluate them."""
    needed: set[str] = set()
    stack = [t for t in targets if t in flat.nodes]
    while stack:
        node_id = stack.pop()
        if node_id in needed:
            continue
        needed.add(node_id)
        inst = flat.nodes[node_id]
        lazy = engine.registry.get(inst.type).lazy_inputs
        wanted = chosen.get(node_id)
        for name, value in inst.inputs.items():
            if isinstance(value, Connection) and value.node in flat.nodes:
                if name in lazy and wanted is not None and name not in wanted:
                    continue
                stack.append(value.node)
    return needed
