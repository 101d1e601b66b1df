"""The workflow model: one canonical JSON format (docs/workflow-format.md), its migrations,
reading and writing, and the graph (dependencies, cycles, execution order).

    {"format": "ditgraph/workflow", "version": 2,
     "nodes": {"3": {"type": "Sampler", "inputs": {"steps": 28, "model": {"from": ["1", "model"]}}}},
     "subgraphs": {...}, "layout": {...}, "meta": {...}}

Inputs are keyed by name, never by position. ``layout`` (positions, groups, viewport) is
kept verbatim and never affects what runs. Validation (app/core/validation.py) reports every
problem at once, each naming the node, the input and the reason; subgraph instances are
expanded first (app/core/subgraphs.py).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from app.core.registry import Registry

FORMAT = "ditgraph/workflow"
Follow = Callable[["NodeInstance", str], bool]  # which inputs a traversal follows
VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("workflow.schema.json")

# MIGRATIONS[n] turns a version-n document into version n+1 (dict -> dict). A migration that
# builds new objects instead of editing nested ones in place sets ``.pure = True``: then the
# caller's document is not deep-copied first.
def _v1_to_v2(document: dict) -> dict:
    """Version 2 added top-level ``subgraphs``; a version-1 document has none."""
    return {**document, "version": 2}


_v1_to_v2.pure = True  # type: ignore[attr-defined]  # edits nothing in place: no deep copy needed


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


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
class Connection:
    """An input wired to output ``output`` of node ``node`` (``{"from": [node, output]}``).

    Not to be confused with :class:`app.core.registry.Link`, the annotation a node author
    writes to declare a socket input.
    """

    node: str
    output: str


@dataclass
class NodeInstance:
    id: str
    type: str
    inputs: dict[str, Any] = field(default_factory=dict)  # constant or Connection
    bypass: bool = False
    title: str | None = None

    def links(self) -> dict[str, Connection]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Connection)}


SUBGRAPH_PREFIX = "subgraph:"  # an instance node's type: "subgraph:NAME"
SUBGRAPH_INPUTS = "@in"  # inside a definition, {"from": ["@in", name]} reads the instance's input


def _parse_input(value: Any) -> Connection | Any:
    """A raw input value: a constant, or a Connection for {"from": [node, output]} (None if malformed)."""
    if not (isinstance(value, dict) and "from" in value):
        return value
    source = value["from"]
    if not isinstance(source, list) or len(source) != 2 or not all(
        isinstance(part, (str, int)) and not isinstance(part, bool) for part in source
    ):
        return None
    return Connection(str(source[0]), str(source[1]))


def parse_nodes(raw_nodes: Any, where: str = "") -> tuple[dict[str, NodeInstance], list[Problem]]:
    """The ``nodes`` object of a workflow (or of a subgraph ``where``) as NodeInstances."""
    if not isinstance(raw_nodes, dict):
        return {}, [Problem(f"{where}'nodes' must be an object mapping node ids to nodes", kind="format")]
    problems: list[Problem] = []
    nodes: dict[str, NodeInstance] = {}
    for node_id, raw in raw_nodes.items():
        shown = f"{where}{node_id}"
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            problems.append(Problem("must be an object with a string 'type'", shown, kind="format"))
            continue
        if "/" in str(node_id):
            problems.append(Problem("node ids may not contain '/' (it separates subgraph levels)", shown, kind="format"))
            continue
        raw_inputs = raw.get("inputs", {})
        if not isinstance(raw_inputs, dict):
            problems.append(Problem("'inputs' must be an object keyed by input name", shown, kind="format"))
            continue
        inputs: dict[str, Any] = {}
        for name, value in raw_inputs.items():
            parsed = _parse_input(value)
            if parsed is None and value is not None:
                problems.append(Problem('a link must be {"from": [node_id, output_name]}', shown, name, "format"))
                continue
            inputs[name] = parsed
        nodes[str(node_id)] = NodeInstance(str(node_id), raw["type"], inputs, bool(raw.get("bypass", False)), raw.get("title"))
    return nodes, problems


def nodes_to_dict(nodes: dict[str, NodeInstance]) -> dict:
    out = {}
    for node_id, inst in nodes.items():
        inputs = {name: {"from": [v.node, v.output]} if isinstance(v, Connection) else v for name, v in inst.inputs.items()}
        entry: dict[str, Any] = {"type": inst.type, "inputs": inputs}
        if inst.bypass:
            entry["bypass"] = True
        if inst.title:
            entry["title"] = inst.title
        out[node_id] = entry
    return out


@dataclass
class SubgraphDef:
    """A reusable graph with named inputs and outputs (docs/workflow-format.md, "Subgraphs").

    ``inputs``: name -> {"type": socket type, "default"?: value, "tooltip"?: text};
    ``outputs``: name -> the inner node output it exposes; ``extra`` keeps everything else
    (description, layout) verbatim for round trips.
    """

    name: str
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, Connection] = field(default_factory=dict)
    nodes: dict[str, NodeInstance] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, raw: Any) -> tuple[SubgraphDef, list[Problem]]:
        where = f"{SUBGRAPH_PREFIX}{name}/"
        if not isinstance(raw, dict):
            return cls(name), [Problem(f"subgraph {name!r} must be an object", kind="format")]
        nodes, problems = parse_nodes(raw.get("nodes"), where)
        inputs = raw.get("inputs") or {}
        if not isinstance(inputs, dict) or not all(isinstance(v, dict) and isinstance(v.get("type"), str) for v in inputs.values()):
            problems.append(Problem(f"subgraph {name!r}: 'inputs' must map names to {{\"type\": ..., \"default\"?: ...}}", kind="format"))
            inputs = {}
        outputs: dict[str, Connection] = {}
        for out_name, value in (raw.get("outputs") or {}).items():
            parsed = _parse_input(value)
            if not isinstance(parsed, Connection):
                problems.append(Problem(f"subgraph {name!r}: output {out_name!r} must be {{\"from\": [inner_id, output]}}", kind="format"))
                continue
            outputs[str(out_name)] = parsed
        extra = {k: v for k, v in raw.items() if k not in ("inputs", "outputs", "nodes")}
        return cls(name, {str(k): dict(v) for k, v in inputs.items()}, outputs, nodes, extra), problems

    def to_dict(self) -> dict:
        outputs = {name: {"from": [c.node, c.output]} for name, c in self.outputs.items()}
        return {**self.extra, "inputs": self.inputs, "outputs": outputs, "nodes": nodes_to_dict(self.nodes)}


@dataclass
class Workflow:
    nodes: dict[str, NodeInstance] = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    subgraphs: dict[str, SubgraphDef] = field(default_factory=dict)  # name -> definition (format v2)
    # after expansion: subgraph instance id -> output name -> the flat value it stands for
    instance_outputs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- reading and writing -------------------------------------------------------------
    @classmethod
    def from_dict(cls, document: Any) -> Workflow:
        """Parse (and migrate) a workflow document; raise WorkflowError naming what is wrong."""
        document = migrate(document)
        nodes, problems = parse_nodes(document.get("nodes"))
        subgraphs: dict[str, SubgraphDef] = {}
        raw_subgraphs = document.get("subgraphs") or {}
        if not isinstance(raw_subgraphs, dict):
            problems.append(Problem("'subgraphs' must be an object mapping names to definitions", kind="format"))
            raw_subgraphs = {}
        for name, raw in raw_subgraphs.items():
            definition, found = SubgraphDef.from_dict(str(name), raw)
            subgraphs[str(name)] = definition
            problems.extend(found)
        if problems:
            raise WorkflowError(problems)
        layout = document.get("layout") or {}
        meta = document.get("meta") or {}
        return cls(nodes, layout if isinstance(layout, dict) else {}, meta if isinstance(meta, dict) else {}, subgraphs)

    def to_dict(self) -> dict:
        document = {"format": FORMAT, "version": VERSION, "nodes": nodes_to_dict(self.nodes),
                    "layout": self.layout, "meta": self.meta}
        if self.subgraphs:
            document["subgraphs"] = {name: sg.to_dict() for name, sg in self.subgraphs.items()}
        return document

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def copy(self) -> Workflow:
        return Workflow.from_dict(copy.deepcopy(self.to_dict()))

    def name(self) -> str:
        return str(self.meta.get("name") or "untitled")

    # -- the graph -----------------------------------------------------------------------------
    def graph(self) -> nx.DiGraph:
        """Edges run from producer to consumer, for connections to nodes that exist."""
        return build_graph(self)

    def output_nodes(self, registry: Registry) -> list[str]:
        """The nodes a run computes by default: every non-bypassed output node."""
        return output_nodes(self, registry)

    def output_size(self) -> tuple[int, int, int] | None:
        """The largest constant ``width`` × ``height`` (× ``frames``) any node asks for (the empty
        latents): what the VRAM plan sizes working memory for; None when no node says."""
        sizes = []
        for inst in self.nodes.values():
            width, height, frames = (inst.inputs.get(k) for k in ("width", "height", "frames"))
            if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
                sizes.append((height, width, frames if isinstance(frames, int) and frames > 0 else 1))
        return max(sizes, key=lambda s: s[0] * s[1] * s[2], default=None)

    def needed(self, targets: list[str], follow: Follow | None = None) -> set[str]:
        """``targets`` and every node they depend on (through the inputs ``follow`` accepts)."""
        return set(self._producers(targets, follow))

    def _producers(self, targets: list[str], follow: Follow | None = None, done=frozenset()) -> dict[str, set[str]]:
        """For ``targets`` and everything they depend on: node id -> the nodes it reads.
        Inputs ``follow(inst, name)`` rejects are not followed; nodes in ``done`` are left out."""
        producers: dict[str, set[str]] = {}
        stack = [t for t in targets if t in self.nodes and t not in done]
        while stack:
            node_id = stack.pop()
            if node_id in producers:
                continue
            inst = self.nodes[node_id]
            found = producers[node_id] = {
                c.node for name, c in inst.inputs.items()
                if isinstance(c, Connection) and c.node in self.nodes and c.node not in done
                and (follow is None or follow(inst, name))
            }
            stack.extend(p for p in found if p not in producers)
        return producers

    def cycles(self, limit: int = 10) -> list[list[str]]:
        """Up to ``limit`` cycles, each as its node ids in link order; [] for a DAG."""
        ordered = set(self.execution_order(list(self.nodes)))
        if len(ordered) == len(self.nodes):
            return []
        stuck = self.graph().subgraph(n for n in self.nodes if n not in ordered)
        return list(itertools.islice(nx.simple_cycles(stuck), limit))

    def execution_order(self, targets: list[str], follow: Follow | None = None, done=frozenset()) -> list[str]:
        """The nodes ``targets`` need, producers before consumers (Kahn's algorithm), ties
        broken by declaration order so a run is deterministic. Nodes on a cycle are left out
        (validation reports cycles before anything runs). ``follow``/``done``: as for
        :meth:`needed` (the executor leaves lazy inputs and finished nodes out)."""
        producers = self._producers(targets, follow, done)
        position = {node_id: i for i, node_id in enumerate(self.nodes)}
        waiting = {node_id: len(found) for node_id, found in producers.items()}
        consumers: dict[str, list[str]] = {}
        for node_id, found in producers.items():
            for producer in found:
                consumers.setdefault(producer, []).append(node_id)
        ready = [(position[n], n) for n, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            node_id = heapq.heappop(ready)[1]
            order.append(node_id)
            for consumer in consumers.get(node_id, ()):
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    heapq.heappush(ready, (position[consumer], consumer))
        return order


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
        in_place = any(not getattr(MIGRATIONS[v], "pure", False) for v in range(version, VERSION))
        document = copy.deepcopy(document) if in_place else document  # never touch the caller's dict
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


# -- the graph ------------------------------------------------------------------------------


def build_graph(workflow: Workflow) -> nx.DiGraph:
    """Edges run from producer to consumer, for links to nodes that exist."""
    graph = nx.DiGraph()
    graph.add_nodes_from(workflow.nodes)
    for node_id, inst in workflow.nodes.items():
        for link in inst.links().values():
            if link.node in workflow.nodes:
                graph.add_edge(link.node, node_id)
    return graph


def output_nodes(workflow: Workflow, registry: Registry) -> list[str]:
    return [
        node_id
        for node_id, inst in workflow.nodes.items()
        if not inst.bypass and (nd := registry.get(inst.type)) is not None and nd.output_node
    ]


def __getattr__(name: str):
    # Validation lives in app.core.validation (which imports this module); the fronts import
    # it from here, so resolve those names lazily rather than with a circular import.
    if name in ("validate", "errors"):
        from app.core import validation

        return getattr(validation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
