"""The workflow model: one canonical JSON format, its migrations, and validation.

    {"format": "ditgraph/workflow", "version": 1,
     "nodes": {"3": {"type": "Sampler", "inputs": {"steps": 28, "model": {"from": ["1", "model"]}}}},
     "layout": {...}, "meta": {...}}

Inputs are keyed by name, never by position. ``layout`` (positions, groups, viewport) is
kept verbatim and never affects what runs. Validation reports every problem at once, each
naming the node, the input and the reason.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from app.core import paths
from app.core.registry import NodeDef, Registry
from app.core.types import accepts

FORMAT = "ditgraph/workflow"
VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("workflow.schema.json")

# MIGRATIONS[n] turns a version-n document into version n+1 (pure dict -> dict).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


class WorkflowError(ValueError):
    """A workflow that cannot be read or run; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow. ``node``/``input`` are None for graph-wide problems."""

    message: str
    node: str | None = None
    input: str | None = None
    kind: str = "invalid"
    severity: str = "error"  # "warning" problems are reported but do not stop a run

    def __str__(self) -> str:
        where = []
        if self.node is not None:
            where.append(f"node {self.node}")
        if self.input is not None:
            where.append(f"input {self.input!r}")
        prefix = ", ".join(where)
        return f"{self.severity}: {prefix + ': ' if prefix else ''}{self.message}"

    def to_dict(self) -> dict:
        return {"node": self.node, "input": self.input, "kind": self.kind, "severity": self.severity, "message": self.message}


@dataclass(frozen=True)
class Link:
    """A connection from output ``output`` of node ``node``."""

    node: str
    output: str


@dataclass
class NodeInstance:
    id: str
    type: str
    inputs: dict[str, Any] = field(default_factory=dict)  # constant or Link
    bypass: bool = False
    title: str | None = None

    def links(self) -> dict[str, Link]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Link)}


@dataclass
class Workflow:
    nodes: dict[str, NodeInstance] = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # -- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: Any) -> Workflow:
        """Parse (and migrate) a workflow document; raise WorkflowError naming what is wrong."""
        document = migrate(document)
        problems: list[Problem] = []
        nodes: dict[str, NodeInstance] = {}
        raw_nodes = document.get("nodes")
        if not isinstance(raw_nodes, dict):
            raise WorkflowError([Problem("'nodes' must be an object mapping node ids to nodes", kind="format")])
        for node_id, raw in raw_nodes.items():
            if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
                problems.append(Problem("must be an object with a string 'type'", node_id, kind="format"))
                continue
            raw_inputs = raw.get("inputs", {})
            if not isinstance(raw_inputs, dict):
                problems.append(Problem("'inputs' must be an object keyed by input name", node_id, kind="format"))
                continue
            inputs: dict[str, Any] = {}
            for name, value in raw_inputs.items():
                if isinstance(value, dict) and "from" in value:
                    source = value["from"]
                    if (
                        not isinstance(source, list)
                        or len(source) != 2
                        or not all(isinstance(part, (str, int)) and not isinstance(part, bool) for part in source)
                    ):
                        problems.append(Problem('a link must be {"from": [node_id, output_name]}', node_id, name, "format"))
                        continue
                    inputs[name] = Link(str(source[0]), str(source[1]))
                else:
                    inputs[name] = value
            nodes[str(node_id)] = NodeInstance(
                str(node_id), raw["type"], inputs, bool(raw.get("bypass", False)), raw.get("title")
            )
        if problems:
            raise WorkflowError(problems)
        layout = document.get("layout") or {}
        meta = document.get("meta") or {}
        return cls(nodes, layout if isinstance(layout, dict) else {}, meta if isinstance(meta, dict) else {})

    def to_dict(self) -> dict:
        nodes = {}
        for node_id, inst in self.nodes.items():
            inputs = {
                name: {"from": [v.node, v.output]} if isinstance(v, Link) else v for name, v in inst.inputs.items()
            }
            entry: dict[str, Any] = {"type": inst.type, "inputs": inputs}
            if inst.bypass:
                entry["bypass"] = True
            if inst.title:
                entry["title"] = inst.title
            nodes[node_id] = entry
        return {"format": FORMAT, "version": VERSION, "nodes": nodes, "layout": self.layout, "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def copy(self) -> Workflow:
        return Workflow.from_dict(copy.deepcopy(self.to_dict()))

    def name(self) -> str:
        return str(self.meta.get("name") or "untitled")


def migrate(document: Any) -> dict:
    """Bring an older document up to VERSION; refuse newer or foreign ones."""
    if not isinstance(document, dict):
        raise WorkflowError([Problem("a workflow must be a JSON object", kind="format")])
    if document.get("format") != FORMAT:
        hint = ""
        if all(isinstance(v, dict) and "class_type" in v for v in document.values()) and document:
            hint = " (this looks like a ComfyUI API-format file: use `ditgraph import-comfy`)"
        raise WorkflowError([Problem(f"'format' must be {FORMAT!r}{hint}", kind="format")])
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WorkflowError([Problem("'version' must be a positive integer", kind="format")])
    if version > VERSION:
        raise WorkflowError(
            [Problem(f"version {version} is newer than this ditgraph understands ({VERSION}); upgrade ditgraph", kind="format")]
        )
    if version < VERSION:
        document = copy.deepcopy(document)  # migrations may edit in place; never touch the caller's dict
    while document["version"] < VERSION:
        document = MIGRATIONS[document["version"]](document)
    return document


def loads(text: str) -> Workflow:
    from app.core.jsonlimits import JSONRefused, parse

    try:
        document = parse(text)  # size and nesting capped: the one parser of untrusted JSON
    except JSONRefused as exc:
        raise WorkflowError([Problem(str(exc), kind="format")]) from None
    return Workflow.from_dict(document)


def load(path: str | os.PathLike) -> Workflow:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError([Problem(f"workflow file {str(path)!r} does not exist", kind="file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError([Problem(f"cannot read workflow file {str(path)!r}: {exc}", kind="file")]) from None
    return loads(text)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(workflow: Workflow, path: str | os.PathLike) -> None:
    atomic_write(path, (workflow.to_json() + "\n").encode("utf-8"))


# -- validation ------------------------------------------------------------------------------


def output_nodes(workflow: Workflow, registry: Registry) -> list[str]:
    return [
        node_id
        for node_id, inst in workflow.nodes.items()
        if not inst.bypass and (nd := registry.get(inst.type)) is not None and nd.output_node
    ]


def _check_inputs(node_id: str, inst: NodeInstance, nd: NodeDef, workflow: Workflow, registry: Registry) -> list[Problem]:
    problems = []
    for name in inst.inputs:
        if name not in nd.inputs:
            known = ", ".join(nd.inputs) or "none"
            problems.append(Problem(f"{inst.type} has no input {name!r} (its inputs: {known})", node_id, name, "unknown_input"))
    for name, decl in nd.inputs.items():
        value = inst.inputs.get(name)
        if isinstance(value, Link):
            source = workflow.nodes.get(value.node)
            if source is None:
                problems.append(Problem(f"linked to node {value.node!r}, which does not exist", node_id, name, "bad_link"))
                continue
            source_def = registry.get(source.type)
            if source_def is None:
                continue  # reported on the source node
            out_type = source_def.output_type(value.output)
            if out_type is None:
                outs = ", ".join(o.name for o in source_def.outputs) or "none"
                problems.append(
                    Problem(f"node {value.node} ({source.type}) has no output {value.output!r} (its outputs: {outs})", node_id, name, "bad_link")
                )
            elif not accepts(decl.type, out_type):
                problems.append(
                    Problem(
                        f"type mismatch: expects {decl.type}, linked to {out_type} output {value.output!r} of node {value.node} ({source.type})",
                        node_id,
                        name,
                        "type_mismatch",
                    )
                )
        elif name not in inst.inputs:
            if decl.required and decl.default is None:
                what = f"a link from a {decl.type} output" if not decl.is_widget else "a value"
                problems.append(Problem(f"required input is missing: needs {what}", node_id, name, "missing_input"))
        elif value is None and decl.optional_link:
            continue
        else:
            reason = decl.check_value(value)
            if reason is None and decl.names_file(value):
                reason = _check_file(decl.spec.file, value)
            if reason:
                problems.append(Problem(reason, node_id, name, "bad_value"))
    return problems


def _check_file(kind: str, value: Any) -> str | None:
    try:
        paths.resolve(kind, value)
    except paths.PathRefused as exc:
        return str(exc)
    return None


def _check_bypass(node_id: str, inst: NodeInstance, nd: NodeDef) -> list[Problem]:
    problems = []
    for out in nd.outputs:
        linked = [decl for name, decl in nd.inputs.items() if isinstance(inst.inputs.get(name), Link)]
        if not any(accepts(out.type, decl.type) for decl in linked):
            problems.append(Problem(f"cannot bypass: no linked input can pass through output {out.name!r} ({out.type})", node_id, kind="bypass"))
    return problems


def build_graph(workflow: Workflow) -> nx.DiGraph:
    """Edges run from producer to consumer, for links to nodes that exist."""
    graph = nx.DiGraph()
    graph.add_nodes_from(workflow.nodes)
    for node_id, inst in workflow.nodes.items():
        for link in inst.links().values():
            if link.node in workflow.nodes:
                graph.add_edge(link.node, node_id)
    return graph


def upstream_closure(graph: nx.DiGraph, targets: list[str]) -> set[str]:
    """``targets`` and everything they depend on, in one traversal."""
    seen = set(targets)
    stack = list(targets)
    while stack:
        for parent in graph.predecessors(stack.pop()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def validate(
    workflow: Workflow, registry: Registry, targets: list[str] | None = None, graph: nx.DiGraph | None = None
) -> list[Problem]:
    """Every problem of ``workflow`` at once (errors and warnings); an empty list means runnable."""
    problems: list[Problem] = []
    for node_id, inst in workflow.nodes.items():
        nd = registry.get(inst.type)
        if nd is None:
            problems.append(Problem(f"unknown node type {inst.type!r} (is its plugin installed?)", node_id, kind="unknown_type"))
            continue
        problems.extend(_check_inputs(node_id, inst, nd, workflow, registry))
        if inst.bypass:
            problems.extend(_check_bypass(node_id, inst, nd))
    graph = graph if graph is not None else build_graph(workflow)
    cycles = [] if nx.is_directed_acyclic_graph(graph) else list(itertools.islice(nx.simple_cycles(graph), 10))
    for cycle in cycles:
        path = " -> ".join(cycle + [cycle[0]])
        problems.append(Problem(f"cycle: {path}", cycle[0], kind="cycle"))
    if targets is not None:
        for target in targets:
            if target not in workflow.nodes:
                problems.append(Problem(f"requested output node {target!r} does not exist", target, kind="bad_target"))
    else:
        outputs = output_nodes(workflow, registry)
        if not outputs and workflow.nodes:
            problems.append(Problem("nothing to run: the workflow has no output node (e.g. SaveImage or PreviewAny)", kind="no_output"))
        if not cycles:
            needed = upstream_closure(graph, outputs)
            for node_id in workflow.nodes:
                nd = registry.get(workflow.nodes[node_id].type)
                if node_id not in needed and nd is not None and nd.extra.get("passive") is not True:
                    problems.append(
                        Problem("nothing requests this node's outputs; it will not run", node_id, kind="unused", severity="warning")
                    )
    return problems


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]
