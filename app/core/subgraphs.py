"""Subgraph expansion and the blueprint library.

A node of type ``subgraph:NAME`` is an instance of the definition NAME (the workflow's own
``subgraphs`` first, then the blueprint library folder). Before validation the instance is
replaced by the definition's nodes under namespaced ids (``up/1``, nested ``up/inner/1``):
``{"from": ["@in", x]}`` inside reads whatever the instance's input ``x`` is (a link, a
widget value, or the input's default), and links to an instance output are rewired to the
inner node output it exposes. The run, its memo keys, ``explain``, progress events and
errors all see the inner nodes. A definition that contains itself (directly or through
others) is refused with the chain named.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.core import paths
from app.core.workflow import (
    SUBGRAPH_INPUTS,
    SUBGRAPH_PREFIX,
    Connection,
    NodeInstance,
    Problem,
    SubgraphDef,
    Workflow,
    WorkflowError,
    atomic_write,
)

BLUEPRINT_FORMAT = "ditgraph/subgraph"
_MISSING = object()


def is_instance(inst: NodeInstance) -> bool:
    return inst.type.startswith(SUBGRAPH_PREFIX)


@dataclass
class _Expansion:
    """State shared by one expansion: where definitions come from, what came out, what went wrong."""

    lookup: Callable[[str], SubgraphDef | None]
    nodes: dict[str, NodeInstance] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    instance_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # flat instance id -> output -> value


class _Level:
    """One graph level: the workflow's nodes, or one instance's copy of a definition."""

    def __init__(self, run: _Expansion, nodes: dict[str, NodeInstance], prefix: str,
                 bindings: dict[str, Callable[[], Any]], stack: tuple[str, ...]):
        self.run, self.nodes, self.prefix, self.bindings, self.stack = run, nodes, prefix, bindings, stack
        self._outputs: dict[str, dict[str, Any] | None] = {}  # instance id -> its outputs (None: expanding)

    def value(self, raw: Any, where: str) -> Any:
        """A raw input value of this level as it is in the flat workflow (or _MISSING)."""
        if not isinstance(raw, Connection):
            return raw
        if raw.node == SUBGRAPH_INPUTS and self.stack:
            binding = self.bindings.get(raw.output)
            if binding is None:
                self.run.problems.append(Problem(f"reads subgraph input {raw.output!r}, which {self.stack[-1]} does not declare",
                                                 where, kind="bad_link"))
                return _MISSING
            return binding()
        inst = self.nodes.get(raw.node)
        if inst is None or not is_instance(inst):
            return Connection(self.prefix + raw.node, raw.output)  # a dangling link is reported by validation
        outputs = self.expand_instance(raw.node)
        if raw.output not in outputs:
            known = ", ".join(outputs) or "none"
            self.run.problems.append(Problem(f"subgraph {inst.type} has no output {raw.output!r} (its outputs: {known})",
                                             where, kind="bad_link"))
            return _MISSING
        return outputs[raw.output]

    def expand_all(self) -> None:
        for node_id, inst in self.nodes.items():
            if is_instance(inst):
                self.expand_instance(node_id)
                continue
            flat_id = self.prefix + node_id
            if flat_id in self.run.nodes:
                self.run.problems.append(Problem("node id collides with a subgraph's inner node id", flat_id, kind="format"))
            inputs = {name: self.value(raw, flat_id) for name, raw in inst.inputs.items()}
            self.run.nodes[flat_id] = NodeInstance(flat_id, inst.type, {k: v for k, v in inputs.items() if v is not _MISSING},
                                                   inst.bypass, inst.title)

    def expand_instance(self, node_id: str) -> dict[str, Any]:
        """Expand one instance (once) and return its outputs as flat values."""
        if node_id in self._outputs:
            found = self._outputs[node_id]
            if found is None:
                self.run.problems.append(Problem("subgraph instances feed each other in a cycle", self.prefix + node_id, kind="cycle"))
                return {}
            return found
        self._outputs[node_id] = None
        inst, flat_id = self.nodes[node_id], self.prefix + node_id
        name = inst.type[len(SUBGRAPH_PREFIX):]
        definition = self.run.lookup(name)
        outputs: dict[str, Any] = {}
        if inst.bypass:
            self.run.problems.append(Problem("a subgraph instance cannot be bypassed; bypass nodes inside it",
                                             flat_id, kind="bypass"))
        elif name in self.stack:
            chain = " -> ".join((*self.stack[self.stack.index(name):], name))
            self.run.problems.append(Problem(f"subgraph recursion: {chain}", flat_id, kind="subgraph_recursion"))
        elif definition is None:
            self.run.problems.append(Problem(f"unknown subgraph {name!r} (not in this workflow's 'subgraphs' nor the "
                                             f"blueprint library {paths.subgraphs_dir()})", flat_id, kind="unknown_type"))
        else:
            child = _Level(self.run, definition.nodes, flat_id + "/", self._bindings(inst, definition, flat_id),
                           (*self.stack, name))
            child.expand_all()
            for out_name, connection in definition.outputs.items():
                outputs[out_name] = child.value(connection, flat_id)
            self.run.instance_outputs[flat_id] = outputs
        self._outputs[node_id] = outputs
        return outputs

    def _bindings(self, inst: NodeInstance, definition: SubgraphDef, flat_id: str) -> dict[str, Callable[[], Any]]:
        for name in inst.inputs:
            if name not in definition.inputs:
                known = ", ".join(definition.inputs) or "none"
                self.run.problems.append(Problem(f"{inst.type} has no input {name!r} (its inputs: {known})", flat_id, name,
                                                 "unknown_input"))
        bindings: dict[str, Callable[[], Any]] = {}
        for name, declared in definition.inputs.items():
            memo: list[Any] = []

            def bound(name=name, declared=declared, memo=memo) -> Any:
                if not memo:  # resolved on first use, so only inputs that are read must resolve
                    raw = inst.inputs.get(name, declared.get("default", _MISSING))
                    memo.append(_MISSING if raw is _MISSING else self.value(raw, flat_id))
                return memo[0]

            bindings[name] = bound
        return bindings


def expand(workflow: Workflow, library: bool = True) -> Workflow:
    """The workflow with every subgraph instance replaced by its namespaced inner nodes.

    Returns ``workflow`` itself when it has no instances. Raises WorkflowError listing every
    problem (unknown subgraph, recursion, unknown instance input or output).
    """
    if not any(is_instance(inst) for inst in workflow.nodes.values()):
        return workflow
    run = _Expansion(_lookup(workflow, library))
    _Level(run, workflow.nodes, "", {}, ()).expand_all()
    if run.problems:
        raise WorkflowError(run.problems)
    return Workflow(run.nodes, workflow.layout, workflow.meta, {}, run.instance_outputs)


def expand_result(owner_id: str, owner_inputs: dict[str, Any], raw_nodes: Any, raw_outputs: Any,
                  workflow: Workflow | None = None) -> tuple[dict[str, NodeInstance], dict[str, Any]]:
    """The nodes a node's returned Expansion adds (ids ``<owner_id>/<local id>``, ``@in`` bound to
    ``owner_inputs``) and its outputs as flat values. Raises WorkflowError naming what is wrong."""
    raw_outputs = raw_outputs if isinstance(raw_outputs, dict) else {}
    definition, problems = SubgraphDef.from_dict(f"expansion of {owner_id}", {
        "inputs": {name: {"type": "*"} for name in owner_inputs},
        "outputs": {name: {"from": source} for name, source in raw_outputs.items()},
        "nodes": raw_nodes,
    })
    if problems:
        raise WorkflowError(problems)
    run = _Expansion(_lookup(workflow or Workflow(), True))
    bindings = {name: (lambda value=value: value) for name, value in owner_inputs.items()}
    child = _Level(run, definition.nodes, owner_id + "/", bindings, (definition.name,))
    child.expand_all()
    outputs = {name: child.value(connection, owner_id) for name, connection in definition.outputs.items()}
    if run.problems:
        raise WorkflowError(run.problems)
    return run.nodes, outputs


def resolve_targets(flat: Workflow, targets: list[str] | None) -> list[str] | None:
    """Targets of an expanded workflow: a subgraph instance id stands for the inner nodes its
    outputs come from."""
    if targets is None:
        return None
    resolved: list[str] = []
    for target in targets:
        outputs = flat.instance_outputs.get(target) if target not in flat.nodes else None
        found = [v.node for v in (outputs or {}).values() if isinstance(v, Connection)]
        resolved.extend(n for n in (found or [target]) if n not in resolved)
    return resolved


def _lookup(workflow: Workflow, library: bool) -> Callable[[str], SubgraphDef | None]:
    """Definitions by name: the workflow's own, then (memoized) the blueprint library."""
    loaded: dict[str, SubgraphDef | None] = {}

    def find(name: str) -> SubgraphDef | None:
        if name in workflow.subgraphs:
            return workflow.subgraphs[name]
        if name not in loaded:
            loaded[name] = None
            if library:
                try:
                    blueprint = load_blueprint(name)
                except (WorkflowError, paths.PathRefused):
                    return None
                loaded.update((k, v) for k, v in blueprint.subgraphs.items() if k not in workflow.subgraphs)
        return loaded.get(name)

    return find


# -- the blueprint library -----------------------------------------------------------------------


def _blueprint_path(name: str):
    return paths.confine(paths.subgraphs_dir(), f"{name}.json")


def save_blueprint(definition: SubgraphDef, uses: dict[str, SubgraphDef] | None = None) -> None:
    """Save a definition into the library as ``<name>.json``, with the definitions it uses."""
    document = {"format": BLUEPRINT_FORMAT, "version": 2, "name": definition.name, **definition.to_dict()}
    if uses:
        document["subgraphs"] = {name: sg.to_dict() for name, sg in uses.items()}
    atomic_write(_blueprint_path(definition.name), (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode())


def load_blueprint(name: str) -> Workflow:
    """A library blueprint as a Workflow whose ``subgraphs`` hold it (under ``name``) and the
    definitions it carries; raises WorkflowError (unreadable) or PathRefused (missing, outside)."""
    path = _blueprint_path(name)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise paths.PathRefused(f"no blueprint {name!r} in {paths.subgraphs_dir()}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkflowError([Problem(f"blueprint {name!r} is unreadable: {exc}", kind="file")]) from None
    if not isinstance(document, dict) or document.get("format") != BLUEPRINT_FORMAT:
        raise WorkflowError([Problem(f"blueprint {name!r}: 'format' must be {BLUEPRINT_FORMAT!r}", kind="format")])
    body = {k: v for k, v in document.items() if k not in ("format", "version", "name", "subgraphs")}
    carried = {**(document.get("subgraphs") or {}), name: body}
    return Workflow.from_dict({"format": "ditgraph/workflow", "version": 2, "nodes": {}, "subgraphs": carried})


def list_blueprints() -> list[str]:
    """Names of the blueprints in the library folder."""
    root = paths.subgraphs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.json")) if root.is_dir() else []
