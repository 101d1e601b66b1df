"""The executor: validate, schedule, memoize, report progress, cancel, recover.

A run computes only what its target nodes (by default every output node) need, in
topological order. Each node's cache key is a content hash of its type, version, constant
inputs, the keys of its upstream outputs and the fingerprints of the files it reads, so a
changed widget re-runs that node and its descendants and nothing else. The engine
remembers each node's last key parts and can say why a node re-ran.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import json
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.core import paths
from app.core.context import RunCancelled, RunContext, reset_current, set_current
from app.core.workflow import (
    Link,
    Problem,
    Workflow,
    WorkflowError,
    build_graph,
    errors,
    output_nodes,
    upstream_closure,
    validate,
)
from app.core.memo import MemoCache
from app.core.registry import NodeDef, NodeResult, Registry, default_registry
from app.core.types import FLOAT, accepts

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
                "ui": self.ui, "error": self.error, "duration": round(self.duration, 4), "reasons": self.reasons}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)


def _diff_reason(old: dict | None, new: dict) -> str:
    """Say in words which part of a node's key changed since its last run."""
    if old is None:
        return "first run of this node"
    if old["type"] != new["type"] or old["version"] != new["version"]:
        return f"node type/version changed ({old['type']} v{old['version']} -> {new['type']} v{new['version']})"
    changes = []
    for name in sorted(set(old["constants"]) | set(new["constants"])):
        before, after = old["constants"].get(name), new["constants"].get(name)
        if before != after:
            changes.append(f"input {name!r} changed {_short(before)} -> {_short(after)}")
    for name in sorted(set(old["links"]) | set(new["links"])):
        if old["links"].get(name) != new["links"].get(name):
            changes.append(f"upstream of {name!r} changed")
    for name in sorted(set(old["files"]) | set(new["files"])):
        if old["files"].get(name) != new["files"].get(name):
            changes.append(f"file of {name!r} changed on disk")
    if old["salt"] != new["salt"]:
        changes.append("engine settings (device/dtype) changed")
    return "; ".join(changes) or "same key as before, but the cached result was evicted"


def _short(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Engine:
    """Runs workflows against one registry, one memo cache and one device."""

    def __init__(
        self,
        registry: Registry | None = None,
        cache: MemoCache | None = None,
        device: str | torch.device | None = None,
        output_dir: str | Path | None = None,
    ):
        self.registry = registry if registry is not None else default_registry()
        self.cache = cache if cache is not None else MemoCache()  # an empty cache is falsy
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.output_dir = Path(output_dir) if output_dir else None
        self._subscribers: list[Callable[[Event], None]] = []
        # why-did-it-rerun memory, per (workflow name, node): least recently used dropped past the limit
        self._last_parts: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self.last_parts_limit = 20_000
        self._run_lock = threading.Lock()
        self.salt = _canonical({"device": self.device.type})

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Receive every event of every run; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _emitter(self, extra: Callable[[Event], None] | None) -> Callable[[Event], None]:
        listeners = list(self._subscribers) + ([extra] if extra else [])
        if not listeners:
            return lambda event: None

        def emit(event: Event) -> None:
            for listener in listeners:
                try:
                    listener(event)
                except Exception:  # a broken listener must not break the run
                    traceback.print_exc()

        return emit

    # -- validation and planning ---------------------------------------------------------
    def validate(self, workflow: Workflow, targets: list[str] | None = None, graph=None) -> list[Problem]:
        return validate(workflow, self.registry, targets, graph)

    def plan(self, workflow: Workflow, targets: list[str] | None = None, graph=None) -> tuple[list[str], list[str]]:
        """(targets, execution order) for a valid workflow."""
        targets = list(targets) if targets is not None else output_nodes(workflow, self.registry)
        graph = graph if graph is not None else build_graph(workflow)
        needed = upstream_closure(graph, targets)
        order = [n for n in _topological(graph, needed)]
        return targets, order

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        workflow: Workflow | dict,
        targets: list[str] | None = None,
        *,
        run_id: str | None = None,
        cancel: threading.Event | None = None,
        on_event: Callable[[Event], None] | None = None,
        scope: str | None = None,
        output_dir: str | Path | None = None,
    ) -> RunResult:
        """Run ``workflow``; raises WorkflowError (nothing ran) if it is invalid.

        Node failures and cancellation do not raise: they end the run with status
        "failed"/"cancelled" and the engine stays usable. ``scope`` names the workflow for
        explanations (defaults to its meta name).
        """
        if isinstance(workflow, dict):
            workflow = Workflow.from_dict(workflow)
        graph = build_graph(workflow)
        problems = errors(self.validate(workflow, targets, graph))
        if problems:
            raise WorkflowError(problems)
        result = RunResult(run_id or uuid.uuid4().hex[:12])
        cancel = cancel or threading.Event()
        emit = self._emitter(on_event)
        scope = scope or workflow.name()
        out_dir = Path(output_dir) if output_dir else (self.output_dir or paths.output_dir())
        document = workflow.to_dict()
        started = time.perf_counter()
        with self._run_lock:
            targets, order = self.plan(workflow, targets, graph)
            emit({"type": "run_started", "run_id": result.run_id, "nodes": order, "targets": targets})
            values: dict[str, tuple] = {}
            keys: dict[str, str] = {}
            current_node = None
            try:
                for node_id in order:
                    current_node = node_id
                    if cancel.is_set():
                        raise RunCancelled(f"run {result.run_id} cancelled")
                    self._run_node(workflow, node_id, values, keys, result, scope, emit, cancel, out_dir, document)
                result.status = "success"
                result.outputs = {t: values[t] for t in targets}
                emit({"type": "run_finished", "run_id": result.run_id, "executed": result.executed, "cached": result.cached})
            except RunCancelled:
                result.status = "cancelled"
                emit({"type": "run_cancelled", "run_id": result.run_id, "node": current_node})
            except NodeFailed as exc:
                result.status = "failed"
                result.error = {"node": exc.node_id, "type": exc.node_type, "message": str(exc), "detail": exc.detail}
                emit({"type": "node_failed", "run_id": result.run_id, "node": exc.node_id, "message": str(exc)})
                emit({"type": "run_failed", "run_id": result.run_id, "error": result.error})
            finally:
                result.duration = time.perf_counter() - started
        return result

    def _node_key(self, inst, nd: NodeDef, keys: dict[str, str]) -> tuple[str, dict, dict, dict]:
        """(cache key, key parts for explanations, constant arguments, resolved file paths)."""
        constants: dict[str, Any] = {}
        links: dict[str, str] = {}
        files: dict[str, str] = {}
        resolved: dict[str, Path] = {}
        for name, decl in nd.inputs.items():
            value = inst.inputs.get(name, decl.default)
            if isinstance(value, Link):
                links[name] = f"{keys[value.node]}:{value.output}"
                continue
            if decl.type == FLOAT and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # JSON from a browser turns 2.0 into 2: one value, one key
            constants[name] = value
            if decl.names_file(value):
                resolved[name] = paths.resolve(decl.spec.file, value)
                files[name] = paths.fingerprint(resolved[name])
        parts = {"type": nd.type, "version": nd.version, "constants": constants, "links": links, "files": files,
                 "salt": self.salt, "bypass": inst.bypass}
        key = hashlib.blake2b(_canonical(parts).encode(), digest_size=16).hexdigest()
        return key, parts, constants, resolved

    def _run_node(self, workflow, node_id, values, keys, result, scope, emit, cancel, out_dir, document) -> None:
        inst = workflow.nodes[node_id]
        nd = self.registry.get(inst.type)
        try:
            key, parts, constants, resolved = self._node_key(inst, nd, keys)
        except paths.PathRefused as exc:
            raise NodeFailed(node_id, inst.type, str(exc)) from None
        keys[node_id] = key
        previous = self._last_parts.get((scope, node_id))
        self._last_parts[(scope, node_id)] = parts
        self._last_parts.move_to_end((scope, node_id))
        while len(self._last_parts) > self.last_parts_limit:
            self._last_parts.popitem(last=False)

        if inst.bypass:
            values[node_id] = self._bypass_outputs(workflow, inst, nd, values)
            result.reasons[node_id] = "bypassed"
            return

        entry = self.cache.get(key)
        if entry is not None:
            values[node_id] = entry.outputs
            result.cached.append(node_id)
            result.reasons[node_id] = "cache hit"
            if entry.ui is not None:
                result.ui[node_id] = entry.ui
            emit({"type": "node_cached", "run_id": result.run_id, "node": node_id, "ui": entry.ui})
            return

        result.reasons[node_id] = _diff_reason(previous, parts)
        kwargs = dict(constants)
        for name, link in inst.links().items():
            kwargs[name] = self._link_value(workflow, link, values)
        kwargs.update((name, str(path)) for name, path in resolved.items())
        emit({"type": "node_started", "run_id": result.run_id, "node": node_id, "node_type": nd.type})
        ctx = RunContext(result.run_id, node_id, nd.type, self.device, out_dir, document, emit, cancel)
        started = time.perf_counter()
        outputs, ui = self._call(nd, node_id, kwargs, ctx)
        elapsed = time.perf_counter() - started
        values[node_id] = outputs
        self.cache.put(key, outputs, ui)
        result.executed.append(node_id)
        result.timings[node_id] = elapsed
        if ui is not None:
            result.ui[node_id] = ui
        emit({"type": "node_finished", "run_id": result.run_id, "node": node_id, "seconds": elapsed, "ui": ui})

    def _call(self, nd: NodeDef, node_id: str, kwargs: dict, ctx: RunContext) -> tuple[tuple, dict | None]:
        token = set_current(ctx)
        try:
            for attempt in (1, 2):
                try:
                    return _normalise(nd, nd.function(**kwargs))
                except RunCancelled:
                    raise
                except Exception as exc:
                    if _is_oom(exc) and attempt == 1:
                        # Free what the memo cache holds on the GPU, then try once more.
                        self.cache.spill_all()
                        gc.collect()
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    message = f"{type(exc).__name__}: {exc}"
                    if _is_oom(exc):
                        message = f"out of memory on {ctx.device} even after freeing cached GPU results: {exc}. " \
                                  "Lower the resolution or batch size, or run with --device cpu."
                    raise NodeFailed(node_id, nd.type, message, traceback.format_exc()) from None
        finally:
            reset_current(token)
        raise AssertionError("unreachable")

    def _link_value(self, workflow: Workflow, link: Link, values: dict[str, tuple]) -> Any:
        """The value a link carries: output ``link.output`` of the already-computed upstream node."""
        source_def = self.registry.get(workflow.nodes[link.node].type)
        return values[link.node][[o.name for o in source_def.outputs].index(link.output)]

    def _bypass_outputs(self, workflow: Workflow, inst, nd: NodeDef, values: dict[str, tuple]) -> tuple:
        """A bypassed node passes, for each output, the first linked input of a matching type."""
        passed = []
        for out in nd.outputs:
            chosen = None
            for name, decl in nd.inputs.items():
                link = inst.inputs.get(name)
                if isinstance(link, Link) and accepts(out.type, decl.type):
                    chosen = self._link_value(workflow, link, values)
                    break
            passed.append(chosen)
        return tuple(passed)

    def _keys(self, workflow: Workflow, targets: list[str] | None = None) -> dict[str, tuple[str, dict]]:
        """node id -> (cache key, key parts) for the nodes ``targets`` need, in run order."""
        keys: dict[str, str] = {}
        found = {}
        for node_id in self.plan(workflow, targets)[1]:
            inst = workflow.nodes[node_id]
            key, parts, _, _ = self._node_key(inst, self.registry.get(inst.type), keys)
            keys[node_id] = key
            found[node_id] = (key, parts)
        return found

    def explain(self, workflow: Workflow, scope: str | None = None) -> dict[str, str]:
        """Without running: for each node, would it be a cache hit, and if not, why not."""
        scope = scope or workflow.name()
        report = {}
        for node_id, (key, parts) in self._keys(workflow).items():
            if key in self.cache:
                report[node_id] = "cache hit"
            else:
                report[node_id] = _diff_reason(self._last_parts.get((scope, node_id)), parts)
        return report

    def forget(self, workflow: Workflow | dict, node_ids: list[str]) -> list[str]:
        """Drop the memoized outputs of ``node_ids`` so the next run recomputes them (nodes
        downstream stay cached unless named too). Returns the ids that were cached."""
        if isinstance(workflow, dict):
            workflow = Workflow.from_dict(workflow)
        keys = self._keys(workflow, list(node_ids))
        return [node_id for node_id in node_ids if self.cache.discard(keys[node_id][0])]


def _normalise(nd: NodeDef, returned: Any) -> tuple[tuple, dict | None]:
    ui = None
    if isinstance(returned, NodeResult):
        ui, returned = returned.ui, returned.outputs
    count = len(nd.outputs)
    if isinstance(returned, dict) and count and set(returned) == {o.name for o in nd.outputs}:
        outputs = tuple(returned[o.name] for o in nd.outputs)
    elif count == 1 and not (isinstance(returned, tuple) and len(returned) == 1):
        outputs = (returned,)
    elif count == 0:
        outputs = ()
    else:
        outputs = tuple(returned)
    if len(outputs) != count:
        raise TypeError(f"{nd.type} returned {len(outputs)} values for {count} outputs")
    return outputs, ui


def _topological(graph, needed: set[str]) -> list[str]:
    """Kahn's algorithm over the needed nodes, ties broken by workflow order (deterministic)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    indegree = {n: sum(1 for p in graph.predecessors(n) if p in needed) for n in needed}
    order = []
    heap = [(position[n], n) for n, degree in indegree.items() if degree == 0]
    heapq.heapify(heap)
    while heap:
        _, node_id = heapq.heappop(heap)
        order.append(node_id)
        for child in graph.successors(node_id):
            if child in indegree:
                indegree[child] -= 1
                if indegree[child] == 0:
                    heapq.heappush(heap, (position[child], child))
    return order
