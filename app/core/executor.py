"""The executor: validate, schedule, memoize, report progress, cancel, recover.

A run computes only what its target nodes (by default every output node) need, in the
order the workflow graph gives (:meth:`Workflow.execution_order`). Each node's cache key
(:func:`app.core.keys.node_key`) hashes its type, version, constant inputs, the keys of its
upstream outputs and the fingerprints of the files it reads, so a changed widget re-runs
that node and its descendants and nothing else. The engine remembers each node's last key
parts and can say why a node re-ran.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.core import paths
from app.core.calls import call_node
from app.core.context import RunCancelled, RunContext
from app.core.keys import NodeKey, diff_reason, engine_salt, node_key
from app.core.memo import MemoCache
from app.core.registry import NodeDef, Registry, default_registry
from app.core.runstate import Event, NodeFailed, RunResult, RunState
from app.core.types import accepts
from app.core.subgraphs import expand, resolve_targets
from app.core.validation import errors, validate, validate_flat
from app.core.workflow import Connection, NodeInstance, Problem, Workflow, WorkflowError

__all__ = ["Engine", "NodeFailed", "RunResult"]


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
        self._last_parts: dict[tuple[str, str], dict] = {}
        self._run_lock = threading.Lock()
        self.salt = engine_salt(self.device.type)

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

    # -- validation, planning, keys ------------------------------------------------------------
    def validate(self, workflow: Workflow, targets: list[str] | None = None) -> list[Problem]:
        return validate(workflow, self.registry, targets)

    def plan(self, workflow: Workflow, targets: list[str] | None = None) -> tuple[list[str], list[str]]:
        """(targets, execution order) for a valid workflow, in expanded (namespaced) node ids."""
        flat = expand(workflow)
        targets = resolve_targets(flat, targets)
        targets = list(targets) if targets is not None else flat.output_nodes(self.registry)
        return targets, flat.execution_order(targets)

    def key_of(self, inst: NodeInstance, keys: dict[str, str]) -> NodeKey:
        """The cache key of one node instance, given the keys of the nodes it reads."""
        return node_key(self.registry.get(inst.type), inst.inputs, keys, self.salt, inst.bypass)

    def node_keys(self, workflow: Workflow, targets: list[str] | None = None) -> dict[str, str]:
        """Node id -> cache key of every node the run needs, in run order, without running."""
        return {node_id: found.key for node_id, found in self._keys(workflow, targets).items()}

    def _node_key(self, inst: NodeInstance, nd: NodeDef, keys: dict[str, str]) -> tuple[str, dict, dict, dict]:
        # Kept only for app/runs/ray_pool.py's copy of the key loop until it calls
        # Engine.node_keys(); remove with that copy.
        found = node_key(nd, inst.inputs, keys, self.salt, inst.bypass)
        return found.key, found.parts, found.constants, found.files

    def _keys(self, workflow: Workflow, targets: list[str] | None = None) -> dict[str, NodeKey]:
        keys: dict[str, str] = {}
        found: dict[str, NodeKey] = {}
        workflow = expand(workflow)
        for node_id in self.plan(workflow, targets)[1]:
            found[node_id] = self.key_of(workflow.nodes[node_id], keys)
            keys[node_id] = found[node_id].key
        return found

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
        flat = expand(workflow)
        targets = resolve_targets(flat, targets)
        problems = errors(validate_flat(flat, self.registry, targets))
        if problems:
            raise WorkflowError(problems)
        state = RunState(
            flat, RunResult(run_id or uuid.uuid4().hex[:12]), scope or workflow.name(), self._emitter(on_event),
            cancel or threading.Event(), Path(output_dir) if output_dir else (self.output_dir or paths.output_dir()),
            workflow.to_dict(),
        )
        started = time.perf_counter()
        with self._run_lock:
            try:
                self._run_all(state, targets)
            finally:
                state.result.duration = time.perf_counter() - started
        return state.result

    def _run_all(self, state: RunState, targets: list[str] | None) -> None:
        result, emit = state.result, state.emit
        targets, order = self.plan(state.workflow, targets)
        emit({"type": "run_started", "run_id": result.run_id, "nodes": order, "targets": targets})
        current_node = None
        try:
            for current_node in order:
                state.check_cancelled()
                self._run_node(state, current_node)
            result.status = "success"
            result.outputs = {t: state.values[t] for t in targets}
            emit({"type": "run_finished", "run_id": result.run_id, "executed": result.executed, "cached": result.cached})
        except RunCancelled:
            result.status = "cancelled"
            emit({"type": "run_cancelled", "run_id": result.run_id, "node": current_node})
        except NodeFailed as exc:
            result.status = "failed"
            result.error = {"node": exc.node_id, "type": exc.node_type, "message": str(exc), "detail": exc.detail}
            emit({"type": "node_failed", "run_id": result.run_id, "node": exc.node_id, "message": str(exc)})
            emit({"type": "run_failed", "run_id": result.run_id, "error": result.error})

    def _run_node(self, state: RunState, node_id: str) -> None:
        inst = state.workflow.nodes[node_id]
        nd = self.registry.get(inst.type)
        result = state.result
        try:
            found = self.key_of(inst, state.keys)
        except paths.PathRefused as exc:
            raise NodeFailed(node_id, inst.type, str(exc)) from None
        state.keys[node_id] = found.key
        previous = self._last_parts.get((state.scope, node_id))
        self._last_parts[(state.scope, node_id)] = found.parts

        if inst.bypass:
            state.values[node_id] = self._bypass_outputs(state, inst, nd)
            result.reasons[node_id] = "bypassed"
            return
        entry = self.cache.get(found.key)
        if entry is not None:
            state.values[node_id] = entry.outputs
            result.cached.append(node_id)
            result.reasons[node_id] = "cache hit"
            if entry.ui is not None:
                result.ui[node_id] = entry.ui
            state.emit({"type": "node_cached", "run_id": result.run_id, "node": node_id, "ui": entry.ui})
            return
        result.reasons[node_id] = diff_reason(previous, found.parts)
        self._execute(state, node_id, nd, found)

    def _execute(self, state: RunState, node_id: str, nd: NodeDef, found: NodeKey) -> None:
        """Call the node (a cache miss), memoize and report its outputs."""
        result, inst = state.result, state.workflow.nodes[node_id]
        kwargs = dict(found.constants)
        for name, connection in inst.links().items():
            kwargs[name] = self._value(state, connection)
        kwargs.update((name, str(path)) for name, path in found.files.items())
        state.emit({"type": "node_started", "run_id": result.run_id, "node": node_id, "node_type": nd.type})
        ctx = RunContext(result.run_id, node_id, nd.type, self.device, state.output_dir, state.document, state.emit, state.cancel)
        started = time.perf_counter()
        outputs, ui = call_node(nd, kwargs, ctx, self.cache)
        elapsed = time.perf_counter() - started
        state.values[node_id] = outputs
        self.cache.put(found.key, outputs, ui)
        result.executed.append(node_id)
        result.timings[node_id] = elapsed
        if ui is not None:
            result.ui[node_id] = ui
        state.emit({"type": "node_finished", "run_id": result.run_id, "node": node_id, "seconds": elapsed, "ui": ui})

    def _value(self, state: RunState, connection: Connection) -> Any:
        """The value a connection carries: an output of an already-computed upstream node."""
        source_def = self.registry.get(state.workflow.nodes[connection.node].type)
        return state.values[connection.node][[o.name for o in source_def.outputs].index(connection.output)]

    def _bypass_outputs(self, state: RunState, inst: NodeInstance, nd: NodeDef) -> tuple:
        """A bypassed node passes, for each output, the first linked input of a matching type."""
        passed = []
        for out in nd.outputs:
            chosen = None
            for name, decl in nd.inputs.items():
                connection = inst.inputs.get(name)
                if isinstance(connection, Connection) and accepts(out.type, decl.type):
                    chosen = self._value(state, connection)
                    break
            passed.append(chosen)
        return tuple(passed)

    # -- explanations and invalidation ---------------------------------------------------------
    def explain(self, workflow: Workflow, scope: str | None = None) -> dict[str, str]:
        """Without running: for each node, would it be a cache hit, and if not, why not."""
        scope = scope or workflow.name()
        report = {}
        for node_id, found in self._keys(workflow).items():
            if found.key in self.cache:
                report[node_id] = "cache hit"
            else:
                report[node_id] = diff_reason(self._last_parts.get((scope, node_id)), found.parts)
        return report

    def forget(self, workflow: Workflow | dict, node_ids: list[str]) -> list[str]:
        """Drop the memoized outputs of ``node_ids`` so the next run recomputes them (nodes
        downstream stay cached unless named too). Returns the ids that were cached."""
        if isinstance(workflow, dict):
            workflow = Workflow.from_dict(workflow)
        keys = self._keys(workflow, list(node_ids))
        return [node_id for node_id in node_ids if node_id in keys and self.cache.discard(keys[node_id].key)]
