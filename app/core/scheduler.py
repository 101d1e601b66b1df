"""One run's node scheduling: eager inputs in graph order, lazy inputs on demand, async nodes
concurrently, expansions inline.

The nodes the targets need through ordinary (eager) inputs run in :meth:`Workflow.execution_order`.
A node with lazy inputs first asks its ``needs`` function which of them it wants, and only
those branches are scheduled (recursion depth is the nesting of lazy nodes, never the length of
a chain). An ``async def`` node is started on the engine's event loop and the run goes on; a
node that reads its outputs waits for it. A node that returns an Expansion has its small graph
added under ``<node id>/<local id>`` and run like any other nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.core import paths
from app.core.calls import call_async_elements, call_async_node, call_node, element_ctx
from app.core.context import RunContext
from app.core.keys import NodeKey, diff_reason, node_key
from app.core.lists import Manifest, combine, element_keys, element_kwargs, from_manifest, label_outputs, mapped_length
from app.core.registry import Expansion, NodeDef
from app.core.runstate import NodeFailed, RunState
from app.core.subgraphs import expand_result
from app.core.types import accepts
from app.core.validation import check_nodes, eager_inputs, errors
from app.core.workflow import Connection, NodeInstance, Workflow, WorkflowError

if TYPE_CHECKING:
    from app.core.executor import Engine


def wanted_lazy(nd: NodeDef, inst: NodeInstance, values: dict[str, Any], evaluated: set[str]) -> set[str]:
    """The lazy inputs ``nd.needs`` asks for next, given the values known so far (without a
    ``needs`` function: every connected lazy input)."""
    if nd.needs is None:
        wanted = [n for n in nd.lazy_inputs if isinstance(inst.inputs.get(n), Connection)]
    else:
        wanted = nd.needs(**values)
    return {n for n in wanted if n in nd.lazy_inputs and n not in evaluated}


@dataclass
class _Pending:
    """An async node started on the event loop, not yet finished."""

    future: concurrent.futures.Future
    nd: NodeDef
    found: NodeKey
    started: float
    complete: Callable[[Any], tuple]  # the future's result -> (outputs, ui)
    manifest: Manifest | None = None  # a mapped node: memoized per element, this under its own key


class Scheduler:
    def __init__(self, engine: Engine, state: RunState):
        self.engine, self.state, self.registry = engine, state, engine.registry
        self.pending: dict[str, _Pending] = {}
        self.follow = eager_inputs(self.registry, state.workflow)
        size = state.workflow.output_size()  # the loaders' VRAM plans size activations for it
        self.memory = {**engine.memory, "size": size} if size else engine.memory

    # -- driving ---------------------------------------------------------------------------------
    def run(self, targets: list[str], order: list[str]) -> None:
        """Compute ``targets`` (and what they need), then wait for async work still running.
        ``order`` is every node the targets may need, in run order."""
        try:
            self.ensure(targets, order if self.follow is None else None)
            self.settle(list(self.pending))
        finally:
            for pending in self.pending.values():  # a failure or cancellation: stop what still runs
                pending.future.cancel()

    def ensure(self, node_ids: list[str], order: list[str] | None = None) -> None:
        """Run (or take from the cache) ``node_ids`` and their eager dependencies (``order``:
        those, already scheduled)."""
        if order is None:
            done = self.state.values.keys() | self.pending.keys()
            order = self.state.workflow.execution_order(node_ids, self.follow, done)
        for node_id in order:
            self.state.check_cancelled()
            self.state.current = node_id
            self.step(node_id)

    def settle(self, node_ids: list[str]) -> None:
        """Wait for the async nodes among ``node_ids`` and record their outputs."""
        for node_id in node_ids:
            pending = self.pending.pop(node_id, None)
            if pending is not None:
                outputs, ui = pending.complete(pending.future.result())
                self._finish(node_id, pending.nd, pending.found, outputs, ui, pending.started, pending.manifest)

    def value(self, connection: Connection) -> Any:
        """The value a connection carries: an output of an already-computed upstream node."""
        self.settle([connection.node])
        source_def = self.registry.get(self.state.workflow.nodes[connection.node].type)
        return self.state.values[connection.node][source_def.output_index[connection.output]]

    # -- one node --------------------------------------------------------------------------------
    def step(self, node_id: str) -> None:
        state, result = self.state, self.state.result
        inst = state.workflow.nodes[node_id]
        nd = self.registry.get(inst.type)
        inputs = inst.inputs
        if nd.lazy_inputs and inst.bypass:  # a bypassed node passes an input on: compute them all
            self.ensure([c.node for c in inst.links().values()])
        elif nd.lazy_inputs:
            inputs = self._resolve_lazy(inst, nd)
        try:  # keys need only upstream keys: an async producer may still be running
            found = node_key(nd, inputs, state.keys, self.engine.salt, inst.bypass,
                             result.run_id if nd.always_run else None)
        except paths.PathRefused as exc:
            raise NodeFailed(node_id, inst.type, str(exc)) from None
        state.keys[node_id] = found.key
        previous = self.engine.remember(state.scope, node_id, found.parts)
        if inst.bypass:
            state.values[node_id] = self._bypass_outputs(inst, nd)
            result.reasons[node_id] = "bypassed"
            return
        entry = None if nd.always_run else self.engine.cache.get(found.key, slot=(state.scope, node_id))
        if entry is not None and isinstance(entry.outputs, Manifest):  # a mapped node: rebuild from its elements
            rebuilt = from_manifest(nd, entry.outputs, self.engine.cache.get)
            if rebuilt is not None:
                self._hit(node_id, *rebuilt, "cache hit (every list element)")
                return
        elif entry is not None:
            self._hit(node_id, entry.outputs, entry.ui, "cache hit")
            return
        result.reasons[node_id] = diff_reason(previous, found.parts)
        self._execute(node_id, nd, found, inputs)

    def _hit(self, node_id: str, outputs: tuple, ui: dict | None, reason: str) -> None:
        state, result = self.state, self.state.result
        state.values[node_id] = outputs
        result.cached.append(node_id)
        result.reasons[node_id] = reason
        if ui is not None:
            result.ui[node_id] = ui
        state.emit({"type": "node_cached", "run_id": result.run_id, "node": node_id, "ui": ui})

    def _resolve_lazy(self, inst: NodeInstance, nd: NodeDef) -> dict[str, Any]:
        """Evaluate the lazy inputs the node's ``needs`` asks for; returns the inputs to key and
        call it with (the lazy inputs left unevaluated are left out: they take their default)."""
        lazy, evaluated = nd.lazy_inputs, set()
        while True:
            values = {name: self.value(v) if isinstance(v := inst.inputs.get(name, decl.default), Connection) else v
                      for name, decl in nd.inputs.items() if name not in lazy or name in evaluated}
            new = wanted_lazy(nd, inst, values, evaluated)
            if not new:
                return {name: v for name, v in inst.inputs.items() if name not in lazy or name in evaluated}
            self.ensure([inst.inputs[n].node for n in new if isinstance(inst.inputs.get(n), Connection)])
            evaluated.update(new)

    def _execute(self, node_id: str, nd: NodeDef, found: NodeKey, inputs: dict) -> None:
        """Call the node (a cache miss); async nodes finish later (see :meth:`settle`)."""
        state, result = self.state, self.state.result
        kwargs = dict(found.constants)
        for name, connection in inputs.items():
            if isinstance(connection, Connection):
                kwargs[name] = self.value(connection)
        kwargs.update((name, str(path)) for name, path in found.files.items())
        try:
            count = mapped_length(nd, kwargs)
        except ValueError as exc:
            raise NodeFailed(node_id, nd.type, str(exc)) from None
        ctx = RunContext(result.run_id, node_id, nd.type, self.engine.device, state.output_dir, state.document,
                         state.emit, state.cancel, memory=self.memory)
        if count is not None:
            self._execute_mapped(node_id, nd, found, kwargs, ctx, count)
            return
        state.emit({"type": "node_started", "run_id": result.run_id, "node": node_id, "node_type": nd.type})
        started = time.perf_counter()

        def complete(returned: tuple) -> tuple:
            outputs, ui = returned
            return (label_outputs(nd, outputs, found.key) if isinstance(outputs, tuple) else outputs), ui

        if nd.is_async:
            future = asyncio.run_coroutine_threadsafe(call_async_node(nd, kwargs, ctx), self.engine.event_loop())
            self.pending[node_id] = _Pending(future, nd, found, started, complete)
            return
        outputs, ui = complete(call_node(nd, kwargs, ctx, self.engine.cache))
        self._finish(node_id, nd, found, outputs, ui, started)

    def _execute_mapped(self, node_id: str, nd: NodeDef, found: NodeKey, kwargs: dict, ctx: RunContext, count: int) -> None:
        """One call per list element, each memoized under its element key: only misses run."""
        cache, result, scope = self.engine.cache, self.state.result, self.state.scope
        keys = element_keys(nd, kwargs, found.parts, count)
        done: dict[int, tuple] = {}
        for index, key in enumerate(keys):
            entry = None if nd.always_run else cache.get(key, slot=(scope, node_id, index))
            if entry is not None:
                done[index] = (entry.outputs, entry.ui)
        missing = [index for index in range(count) if index not in done]
        if not missing:
            self._hit(node_id, *combine(nd, [done[i] for i in range(count)], keys), "cache hit (every list element)")
            cache.put(found.key, Manifest(tuple(keys)), slot=(scope, node_id))
            return
        result.reasons[node_id] += f" ({len(missing)} of {count} list elements run)"
        self.state.emit({"type": "node_started", "run_id": result.run_id, "node": node_id, "node_type": nd.type})
        started = time.perf_counter()
        calls = [(element_kwargs(nd, kwargs, index), element_ctx(ctx, index, count)) for index in missing]

        def complete(returned: list) -> tuple:
            for index, (outputs, ui) in zip(missing, returned, strict=True):
                cache.put(keys[index], outputs, ui, slot=(scope, node_id, index))
                done[index] = (outputs, ui)
            return combine(nd, [done[i] for i in range(count)], keys)

        if nd.is_async:
            future = asyncio.run_coroutine_threadsafe(call_async_elements(nd, calls), self.engine.event_loop())
            self.pending[node_id] = _Pending(future, nd, found, started, complete, Manifest(tuple(keys)))
            return
        outputs, ui = complete([call_node(nd, arguments, element, cache) for arguments, element in calls])
        self._finish(node_id, nd, found, outputs, ui, started, Manifest(tuple(keys)))

    def _finish(self, node_id: str, nd: NodeDef, found: NodeKey, outputs: tuple | Expansion, ui: dict | None,
                started: float, manifest: Manifest | None = None) -> None:
        state, result = self.state, self.state.result
        if isinstance(outputs, Expansion):
            outputs = self._run_expansion(node_id, nd, outputs)
        elapsed = time.perf_counter() - started
        state.values[node_id] = outputs
        slot = (state.scope, node_id)  # one of a bounded number of versions of this node (app.core.memo)
        if manifest is not None:
            self.engine.cache.put(found.key, manifest, slot=slot)
        else:
            self.engine.cache.put(found.key, outputs, ui, slot=slot)
        result.executed.append(node_id)
        result.timings[node_id] = elapsed
        if ui is not None:
            result.ui[node_id] = ui
        state.emit({"type": "node_finished", "run_id": result.run_id, "node": node_id, "seconds": elapsed, "ui": ui})

    def _run_expansion(self, node_id: str, nd: NodeDef, expansion: Expansion) -> tuple:
        """Add a returned graph's nodes to the run, run them, and return the node's outputs."""
        inst = self.state.workflow.nodes[node_id]
        bindings = {name: inst.inputs.get(name, decl.default) for name, decl in nd.inputs.items()}
        try:
            added, outputs = expand_result(node_id, bindings, expansion.nodes, expansion.outputs)
            missing = [o.name for o in nd.outputs if o.name not in outputs]
            if missing:
                raise ValueError(f"its expansion does not provide output(s) {', '.join(missing)}")
            workflow = Workflow({**self.state.workflow.nodes, **added}, self.state.workflow.layout, self.state.workflow.meta)
            problems = errors(check_nodes(workflow, self.registry, list(added)))
            if problems:
                raise ValueError("its expansion is invalid: " + "; ".join(map(str, problems)))
        except (WorkflowError, ValueError) as exc:
            raise NodeFailed(node_id, nd.type, str(exc)) from None
        self.state.workflow = workflow  # a per-run copy: the caller's workflow is not changed
        self.follow = eager_inputs(self.registry, workflow)
        self.ensure([v.node for v in outputs.values() if isinstance(v, Connection)])
        return tuple(self.value(v) if isinstance(v, Connection) else v for v in (outputs[o.name] for o in nd.outputs))

    def _bypass_outputs(self, inst: NodeInstance, nd: NodeDef) -> tuple:
        """A bypassed node passes, for each output, the first linked input of a matching type."""
        passed = []
        for out in nd.outputs:
            chosen = None
            for name, decl in nd.inputs.items():
                connection = inst.inputs.get(name)
                if isinstance(connection, Connection) and accepts(out.type, decl.type):
                    chosen = self.value(connection)
                    break
            passed.append(chosen)
        return tuple(passed)
