"""ComfyUI subgraphs as ditgraph subgraphs (workflow format v2), where this ditgraph has them.

The editor-format import first inlines every subgraph instance (inner ids ``INSTANCE:INNER``)
so the mapping table, folds and fixups see one graph. When the workflow format knows
subgraphs (``app.core.workflow.SUBGRAPH_PREFIX``), :func:`regroup` then moves each instance's
converted nodes back into a definition: links crossing into it become the definition's inputs
(``{"from": ["@in", name]}`` inside, typed by the node output feeding them), links leaving it
its outputs. Identical definitions are shared. :func:`inline` is the reverse (for export).
"""

from __future__ import annotations

import copy
from typing import Any

from app.core import workflow as core_workflow

PREFIX = getattr(core_workflow, "SUBGRAPH_PREFIX", None)  # "subgraph:" once the format has subgraphs
INPUTS = getattr(core_workflow, "SUBGRAPH_INPUTS", "@in")
SUPPORTED = PREFIX is not None


def _unique(name: str, taken: set[str]) -> str:
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    taken.add(candidate)
    return candidate


class _Grouper:
    def __init__(self, document: dict, registry):
        self.nodes, self.registry = document["nodes"], registry
        self.layout = document.setdefault("layout", {}).setdefault("nodes", {})
        self.subgraphs: dict[str, dict] = {}
        self.bases: dict[str, str] = {}  # definition name -> the ComfyUI subgraph name it came from
        self.out_types: dict[str, dict[str, str]] = {}  # instance id -> output name -> socket type

    def socket_type(self, source: str, output: str) -> str:
        kind = self.nodes[source]["type"]
        if PREFIX and kind.startswith(PREFIX):
            return self.out_types.get(source, {}).get(output, "*")
        nd = self.registry.get(kind)
        return (nd.output_type(output) if nd else None) or "*"

    def group(self, instance: str, name: str, pos: list[float]) -> str:
        """Replace the nodes of ``instance`` by one instance node; the definition's name."""
        prefix = instance + ":"
        members = {k[len(prefix):]: v for k, v in self.nodes.items() if k.startswith(prefix)}
        definition: dict[str, Any] = {"inputs": {}, "outputs": {}, "nodes": {}, "layout": {"nodes": {}}}
        instance_inputs: dict[str, Any] = {}
        entering: dict[tuple[str, str], str] = {}
        for inner, node in members.items():
            inputs = {}
            for key, value in node["inputs"].items():
                if isinstance(value, dict) and "from" in value and not value["from"][0].startswith(prefix):
                    source = tuple(value["from"])
                    if source not in entering:
                        entering[source] = _unique(key, set(definition["inputs"]))
                        definition["inputs"][entering[source]] = {"type": self.socket_type(*source)}
                        instance_inputs[entering[source]] = {"from": list(source)}
                    value = {"from": [INPUTS, entering[source]]}
                elif isinstance(value, dict) and "from" in value:
                    value = {"from": [value["from"][0][len(prefix):], value["from"][1]]}
                inputs[key] = value
            definition["nodes"][inner] = {**node, "inputs": inputs}
            if prefix + inner in self.layout:
                definition["layout"]["nodes"][inner] = self.layout.pop(prefix + inner)
        leaving: dict[tuple[str, str], str] = {}
        for node_id, node in self.nodes.items():
            if node_id.startswith(prefix):
                continue
            for key, value in node["inputs"].items():
                if isinstance(value, dict) and "from" in value and value["from"][0].startswith(prefix):
                    inner, output = value["from"][0][len(prefix):], value["from"][1]
                    if (inner, output) not in leaving:
                        leaving[(inner, output)] = _unique(output, set(definition["outputs"]))
                        definition["outputs"][leaving[(inner, output)]] = {"from": [inner, output]}
                    node["inputs"][key] = {"from": [instance, leaving[(inner, output)]]}
        self.out_types[instance] = {out: self.socket_type(prefix + inner, output) for (inner, output), out in leaving.items()}
        for key in [k for k in self.nodes if k.startswith(prefix)]:
            del self.nodes[key]
        chosen = self.name_for(name, definition)
        self.nodes[instance] = {"type": f"{PREFIX}{chosen}", "inputs": instance_inputs, "title": name}
        self.layout[instance] = {"pos": [round(pos[0]), round(pos[1])]}
        return chosen

    def name_for(self, name: str, definition: dict) -> str:
        """Share a definition with an identical one of the same ComfyUI subgraph; else a fresh name."""
        base = (name or "subgraph").replace("/", "-")
        for existing, other in self.subgraphs.items():
            same = self.bases[existing] == base and all(other[k] == definition[k] for k in ("nodes", "inputs"))
            if same and all(other["outputs"].get(k, v) == v for k, v in definition["outputs"].items()):
                other["outputs"].update(definition["outputs"])  # instances may use different outputs of one graph
                return existing
        chosen = _unique(base, set(self.subgraphs))
        self.subgraphs[chosen], self.bases[chosen] = definition, base
        return chosen


def regroup(document: dict, instances: dict[str, tuple[str, list[float]]], registry) -> list[str]:
    """Turn the inlined ``instances`` (id -> (ComfyUI subgraph name, position)) back into subgraphs, in place."""
    grouper = _Grouper(document, registry)
    notes = []
    for instance in sorted(instances, key=lambda i: -i.count(":")):  # nested ones first: they become members
        name, pos = instances[instance]
        if any(k.startswith(instance + ":") for k in document["nodes"]):
            chosen = grouper.group(instance, name, pos)
            notes.append(f"subgraph {name!r} (node {instance}) is the ditgraph subgraph {chosen!r}")
    if grouper.subgraphs:
        document["subgraphs"] = grouper.subgraphs
    return notes


def inline(document: dict) -> dict:
    """The document with every subgraph instance replaced by its definition's nodes (ids "INSTANCE:INNER")."""
    definitions = document.get("subgraphs") or {}
    nodes = copy.deepcopy(document.get("nodes") or {})  # the caller's document stays as it is
    for _ in range(64):  # nested instances are inlined level by level
        instances = [k for k, v in nodes.items() if PREFIX and v["type"].startswith(PREFIX)]
        if not instances:
            break
        for instance in instances:
            _inline_one(nodes, instance, definitions.get(nodes[instance]["type"][len(PREFIX):]) or {})
    return {**document, "nodes": nodes, "subgraphs": {}}


def _inline_one(nodes: dict, instance: str, definition: dict) -> None:
    node = nodes.pop(instance)
    prefix = instance + ":"

    def inner_value(value: Any) -> Any:
        if isinstance(value, dict) and "from" in value:
            source, output = value["from"]
            return node["inputs"].get(output) if source == INPUTS else {"from": [prefix + source, output]}
        return value

    for inner, member in (definition.get("nodes") or {}).items():
        nodes[prefix + inner] = {**member, "inputs": {k: inner_value(v) for k, v in member["inputs"].items()
                                                     if inner_value(v) is not None}}
    outputs = {name: inner_value(src) for name, src in (definition.get("outputs") or {}).items()}
    for other in nodes.values():
        for key, value in other["inputs"].items():
            if isinstance(value, dict) and value.get("from", [None])[0] == instance:
                other["inputs"][key] = outputs.get(value["from"][1])
