"""The executor: validate, schedule, memoize, report progress, cancel, recover.

A run computes only what its target nodes (by default every output node) need, in the
order the workflow graph gives (:meth:`Workflow.execution_order`). Each node's cache key
(:func:`app.core.keys.node_key`) hashes its type, version, constant inputs, the keys of its
upstream outputs and the fingerprints of the files it reads, so a changed widget re-runs
that node and its descendants and nothing else. The engine remembers each node's last key
parts and can say why a node re-ran.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from app.core import paths
from app.core.cache_policies import CachePolicy, parse_cache_policy
from app.core.context import RunCancelled
from app.core.explain import cached_outputs, estimates, static_keys
from app.core.keys import NodeKey, diff_reason, engine_salt
from app.core.memo import MemoCache
from app.core.registry import Registry, default_registry
from app.core.runstate import Event, NodeFailed, RunResult, RunState
from app.core.scheduler import Scheduler
from app.core.subgraphs import expand, resolve_targets
from app.core.validation import errors, validate, validate_flat
from app.core.workflow import Problem, Workflow, WorkflowError

__all__ = ["Engine", "NodeFailed", "RunResult"]


class Engine:
    """Runs workflows against one registry, one memo cache and one device."""

    def __init__(
        self,
        registry: Registry | None = None,
        cache: MemoCache | None = None,
        device: str | torch.device | None = None,
        output_dir: str | Path | None = None,
        cache_policy: CachePolicy | str | None = None,
        memory: dict | None = None,
    ):
        """``cache_policy`` (app/core/cache_policies.py: "lru", "lru:8G", "workflows:3",
        "ram:0.2", "none") replaces the cache's policy when given. ``memory``: the VRAM budget
        as plain data, {"vram": bytes, "reserve": bytes} (app.models.memory.memory_settings)."""
        self.registry = registry if registry is not None else default_registry()
        self.cache = cache if cache is not None else MemoCache()  # an empty cache is falsy
        if cache_policy is not None:
            self.cache.policy = parse_cache_policy(cache_policy)
            self.cache.max_bytes = self.cache.policy.max_bytes or self.cache.max_bytes
        self.memory = {**(memory or {}), "make_room": self.cache.make_room}
        if self.memory.get("vram"):  # memo GPU entries obey the same budget as the models
            self.cache.max_device_bytes = self.memory["vram"] - self.memory.get("reserve", 0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.output_dir = Path(output_dir) if output_dir else None
        self._subscribers: list[Callable[[Event], None]] = []
        # why-did-it-rerun memory, per (workflow name, node): least recently used dropped past the limit
        self._last_parts: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self.last_parts_limit = 20_000
        self._run_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
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

    def node_keys(self, workflow: Workflow, targets: list[str] | None = None) -> dict[str, str]:
        """Node id -> cache key of every node the run needs whose key is known before running
        (all of them unless a lazy choice depends on values not computed yet), in run order."""
        return {node_id: found.key for node_id, found in self._keys(workflow, targets)[0].items()}

    def _keys(self, workflow: Workflow, targets: list[str] | None = None) -> tuple[dict[str, NodeKey], dict[str, str]]:
        flat = expand(workflow)
        targets, _ = self.plan(flat, targets)
        return static_keys(self, flat, targets)

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
        flat, targets, order = self.prepare(workflow, targets)
        state = RunState(
            flat, RunResult(run_id or uuid.uuid4().hex[:12]), scope or workflow.name(), self._emitter(on_event),
            cancel or threading.Event(), Path(output_dir) if output_dir else (self.output_dir or paths.output_dir()),
            workflow.to_dict(),
        )
        started = time.perf_counter()
        with self._run_lock:
            try:
                self.cache.begin_run(state.scope)
                self._run_all(state, targets, order)
            finally:
                state.result.duration = time.perf_counter() - started
        return state.result

    def prepare(self, workflow: Workflow, targets: list[str] | None = None) -> tuple[Workflow, list[str], list[str]]:
        """Expand subgraphs, validate (raising WorkflowError with every problem) and schedule:
        (flat workflow, targets, the order of every node the targets may need)."""
        flat = expand(workflow)
        targets = resolve_targets(flat, targets)
        problems = errors(validate_flat(flat, self.registry, targets))
        if problems:
            raise WorkflowError(problems)
        targets = list(targets) if targets is not None else flat.output_nodes(self.registry)
        return flat, targets, flat.execution_order(targets)

    def _run_all(self, state: RunState, targets: list[str], order: list[str]) -> None:
        result, emit = state.result, state.emit
        emit({"type": "run_started", "run_id": result.run_id, "nodes": order, "targets": targets})
        try:
            Scheduler(self, state).run(targets, order)
            result.status = "success"
            result.outputs = {t: state.values[t] for t in targets}
            result.skipped = [n for n in order if n not in state.values]
            result.reasons.update((n, "not needed") for n in result.skipped)
            emit({"type": "run_finished", "run_id": result.run_id, "executed": result.executed, "cached": result.cached})
        except RunCancelled:
            result.status = "cancelled"
            emit({"type": "run_cancelled", "run_id": result.run_id, "node": state.current})
        except NodeFailed as exc:
            result.status = "failed"
            result.error = {"node": exc.node_id, "type": exc.node_type, "message": str(exc), "detail": exc.detail}
            emit({"type": "node_failed", "run_id": result.run_id, "node": exc.node_id, "message": str(exc)})
            emit({"type": "run_failed", "run_id": result.run_id, "error": result.error})

    def remember(self, scope: str, node_id: str, parts: dict) -> dict | None:
        """Record a node's key parts for explanations; returns those of its previous run."""
        previous = self._last_parts.get((scope, node_id))
        self._last_parts[(scope, node_id)] = parts
        self._last_parts.move_to_end((scope, node_id))
        while len(self._last_parts) > self.last_parts_limit:
            self._last_parts.popitem(last=False)
        return previous

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop async nodes run on (a daemon thread, started on first use)."""
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="ditgraph-async-nodes", daemon=True).start()
                self._loop = loop
            return self._loop

    # -- explanations and invalidation ---------------------------------------------------------
    def explain(self, workflow: Workflow, scope: str | None = None) -> dict[str, str]:
        """Without running: for each node, would it be a cache hit, and if not, why not (or
        "not needed": a lazy branch nothing asks for)."""
        scope = scope or workflow.name()
        found, notes = self._keys(workflow)
        report = {}
        for node_id in expand(workflow).execution_order(list(found) + list(notes)):
            if node_id in notes:
                report[node_id] = notes[node_id]
            elif cached_outputs(self, self.registry.get(found[node_id].parts["type"]), found[node_id].key) is not None:
                report[node_id] = "cache hit"
            else:
                report[node_id] = diff_reason(self._last_parts.get((scope, node_id)), found[node_id].parts)
        return report

    def estimates(self, workflow: Workflow, targets: list[str] | None = None,
                  device: str | torch.device | None = None) -> dict[str, dict]:
        """Without running: node id -> what each node with an ``estimate`` hook would need (a
        loader's VRAM plan under this engine's budget), for ``device`` (default: the engine's)."""
        found, _ = self._keys(workflow, targets)
        size = expand(workflow).output_size()  # as the run will size the plans
        return estimates(self, found, torch.device(device) if device else self.device,
                         {**self.memory, "size": size} if size else self.memory)

    def forget(self, workflow: Workflow | dict, node_ids: list[str]) -> list[str]:
        """Drop the memoized outputs of ``node_ids`` so the next run recomputes them (nodes
        downstream stay cached unless named too). Returns the ids that were cached."""
        if isinstance(workflow, dict):
            workflow = Workflow.from_dict(workflow)
        keys = self._keys(workflow, list(node_ids))[0]
        return [node_id for node_id in node_ids if node_id in keys and self.cache.discard(keys[node_id].key)]
