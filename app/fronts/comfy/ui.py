"""ComfyUI editor (UI-format) workflows -> the API format plus a ditgraph ``layout``.

The editor format lists ``nodes`` (with positional ``widgets_values``) and ``links``
(``[id, origin, origin_slot, target, target_slot, type]`` or objects). On the way:
subgraph definitions (ComfyUI 2025) and legacy group nodes are inlined (ditgraph's format
has no subgraphs yet), reroutes, bypassed and muted nodes are linked past, and legacy
primitive nodes push their value into the inputs they feed. Widget values are named with
the widget order of the mapping table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.fronts.comfy.shape import check_document
from app.fronts.comfy.table import TABLE, ComfyImportError

BYPASS, MUTED = 4, 2
PASS_TYPES = {"Reroute", "$in", "$out"}  # slot k in -> slot k out
SKIPPED = {"PrimitiveNode"}  # legacy editor-only primitives: their value is pushed into their targets
Slot = tuple[str, int]


def is_ui_format(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("nodes"), list) and "links" in document


def _links(raw_links: list) -> list[tuple[Any, int, Any, int]]:
    out = []
    for link in raw_links or []:
        if isinstance(link, dict):
            out.append((link.get("origin_id"), link.get("origin_slot"), link.get("target_id"), link.get("target_slot")))
        elif isinstance(link, list) and len(link) >= 5:
            out.append((link[1], link[2], link[3], link[4]))
    return out


@dataclass
class Flat:
    """One graph without subgraphs: nodes by string id, and each input slot's source."""

    nodes: dict[str, dict] = field(default_factory=dict)
    incoming: dict[Slot, Slot] = field(default_factory=dict)
    constants: dict[Slot, Any] = field(default_factory=dict)
    offsets: dict[str, tuple[float, float]] = field(default_factory=dict)  # inner nodes: where their subgraph sits
    inlined: list[str] = field(default_factory=list)  # notes on inlined group nodes
    instances: dict[str, tuple[str, list[float]]] = field(default_factory=dict)  # subgraph instance -> (name, pos)
    groups: list[dict] = field(default_factory=list)


def _subgraphs(document: dict) -> dict[str, dict]:
    definitions = document.get("definitions") or {}
    return {s["id"]: s for s in definitions.get("subgraphs") or [] if isinstance(s, dict) and "id" in s}


def _group_nodes(document: dict) -> dict[str, dict]:
    groups = (document.get("extra") or {}).get("groupNodes") or {}
    return {f"workflow{sep}{name}": g for name, g in groups.items() for sep in (">", "/")}


def _add_graph(flat: Flat, nodes: list, links: list, prefix: str, io: dict[str, str], defs: dict, depth: int) -> None:
    """Add one graph level; ``io`` maps the subgraph's input/output node ids (-10/-20) to pseudo-nodes."""
    if depth > 32:
        raise ComfyImportError("subgraphs nested more than 32 deep")
    for origin, origin_slot, target, target_slot in _links(links):
        source = io.get(str(origin), f"{prefix}{origin}")
        flat.incoming[(io.get(str(target), f"{prefix}{target}"), int(target_slot))] = (source, int(origin_slot))
    for node in nodes:
        node_id = f"{prefix}{node.get('id')}"
        kind = node.get("type")
        if kind in defs:
            _inline(flat, node, node_id, defs, depth)
        elif kind in defs.get("$groups", {}):
            _inline_group(flat, node, node_id, defs["$groups"][kind])
        else:
            flat.nodes[node_id] = node


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _promoted_values(node: dict, sub: dict, names: list) -> dict[int, Any]:
    """Subgraph input index -> the value the instance's ``widgets_values`` gives it. Older files
    hold one value per input shown as a widget on the instance; newer ones one per widget-typed
    input of the definition, shown or not (told apart by the count)."""
    values = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
    shown = [names.index(slot.get("name")) if slot.get("name") in names else index
             for index, slot in enumerate(node.get("inputs") or []) if slot.get("widget")]
    typed = [index for index, slot in enumerate(sub.get("inputs") or []) if slot.get("type") in WIDGET_TYPES]
    slots = typed if len(values) != len(shown) and len(values) == len(typed) else shown
    return dict(zip(slots, values, strict=False))


def _inline(flat: Flat, node: dict, node_id: str, defs: dict, depth: int) -> None:
    """A subgraph instance: its inner nodes join the graph as "<instance>:<inner id>"."""
    sub = defs[node["type"]]
    names = [s.get("name") for s in sub.get("inputs") or []]
    flat.nodes[f"{node_id}:$in"] = {"type": "$in", "mode": 0}
    flat.nodes[f"{node_id}:$out"] = {"type": "$out", "mode": node.get("mode", 0)}
    for index, slot in enumerate(node.get("inputs") or []):
        inner = names.index(slot.get("name")) if slot.get("name") in names else index
        if (node_id, index) in flat.incoming:
            flat.incoming[(f"{node_id}:$in", inner)] = flat.incoming.pop((node_id, index))
    for inner, value in _promoted_values(node, sub, names).items():
        if value is not None and (f"{node_id}:$in", inner) not in flat.incoming:
            flat.constants[(f"{node_id}:$in", inner)] = value
    for (target, slot), (origin, origin_slot) in list(flat.incoming.items()):
        if origin == node_id:  # consumers of the instance read the subgraph's output node
            flat.incoming[(target, slot)] = (f"{node_id}:$out", origin_slot)
    x, y = _pos(node)
    flat.offsets[f"{node_id}:"] = (x, y)
    flat.instances[node_id] = (str(sub.get("name") or sub["id"]), [x, y])
    groups = sub.get("groups") if isinstance(sub.get("groups"), list) else []
    flat.groups += [{**group, "$offset": (x, y)} for group in groups if isinstance(group, dict)]
    inner_io = {str((sub.get("inputNode") or {}).get("id", -10)): f"{node_id}:$in",
                str((sub.get("outputNode") or {}).get("id", -20)): f"{node_id}:$out"}
    _add_graph(flat, sub.get("nodes") or [], sub.get("links") or [], f"{node_id}:", inner_io, defs, depth + 1)


def _inline_group(flat: Flat, node: dict, node_id: str, group: dict) -> None:
    """A legacy group node: inner nodes by index; its free inputs, outputs and widgets in inner order."""
    inner = sorted(group.get("nodes") or [], key=lambda n: n.get("index", 0))
    internal = {(str(t), int(ts)): (str(o), int(os)) for o, os, t, ts, *_ in group.get("links") or []}
    linked_out = {(o, os) for o, os in internal.values()}
    values = list(node.get("widgets_values") or [])
    free_in, free_out, position = [], [], 0
    for member in inner:
        index = str(member.get("index"))
        member_id = f"{node_id}:{index}"
        mapping = TABLE.get(member.get("type"))
        count = len(mapping.widgets) if mapping else len(member.get("widgets_values") or [])
        flat.nodes[member_id] = {**member, "id": member_id, "mode": member.get("mode", node.get("mode", 0)),
                                 "widgets_values": values[position:position + count] or member.get("widgets_values")}
        position += count
        for slot, spec in enumerate(member.get("inputs") or []):
            if (index, slot) in internal:
                flat.incoming[(member_id, slot)] = (f"{node_id}:{internal[(index, slot)][0]}", internal[(index, slot)][1])
            elif not spec.get("widget"):
                free_in.append((member_id, slot))
        free_out += [(member_id, slot) for slot in range(len(member.get("outputs") or []))
                     if (index, slot) not in linked_out]
    for index, target in enumerate(free_in):
        if (node_id, index) in flat.incoming:
            flat.incoming[target] = flat.incoming.pop((node_id, index))
    for (target, slot), (origin, origin_slot) in list(flat.incoming.items()):
        if origin == node_id and origin_slot < len(free_out):
            flat.incoming[(target, slot)] = free_out[origin_slot]
    flat.inlined.append(f"group node {node.get('type')!r} (node {node_id}) was inlined")


def _bypass_slot(node: dict, out_slot: int) -> int | None:
    """The input a bypassed node passes to output ``out_slot``: same type, same index first."""
    outputs, inputs = node.get("outputs") or [], node.get("inputs") or []
    kind = outputs[out_slot].get("type") if out_slot < len(outputs) else None
    candidates = [i for i, spec in enumerate(inputs) if spec.get("type") == kind]
    return out_slot if out_slot in candidates else (candidates[0] if candidates else None)


def _pos(node: dict) -> tuple[float, float]:
    pos = node.get("pos")
    if isinstance(pos, dict):  # older editors wrote {"0": x, "1": y}
        pos = [pos.get("0", 0), pos.get("1", 0)]
    numbers = isinstance(pos, list) and len(pos) >= 2 and all(isinstance(v, (int, float)) for v in pos[:2])
    return (float(pos[0]), float(pos[1])) if numbers else (0.0, 0.0)


def _resolve(flat: Flat, slot: Slot, depth: int = 0) -> tuple[str, Any] | None:
    """("link", (node, output)) or ("const", value) for an input slot, past reroutes, subgraph
    borders, bypassed nodes and primitive nodes; None when nothing (or a muted node) feeds it."""
    source = flat.incoming.get(slot)
    if source is None or depth > 1000:
        return ("const", flat.constants[slot]) if slot in flat.constants else None
    origin, origin_slot = source
    node = flat.nodes.get(origin)
    if node is None or node.get("mode") == MUTED:
        return None
    kind = node.get("type")
    if kind in PASS_TYPES:
        return _resolve(flat, (origin, 0 if kind == "Reroute" else origin_slot), depth + 1)
    if node.get("mode") == BYPASS:
        through = _bypass_slot(node, origin_slot)
        return None if through is None else _resolve(flat, (origin, through), depth + 1)
    if kind in SKIPPED:
        values = node.get("widgets_values") or []
        return ("const", values[0]) if values else None
    return ("link", (origin, origin_slot))


def _widget_inputs(node: dict) -> dict[str, Any]:
    """Name the positional ``widgets_values`` with the table's widget order for the node's type."""
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some node packs save widgets by name already
        return {k: v for k, v in values.items() if not isinstance(v, (dict, list))}
    mapping = TABLE.get(node.get("type"))
    if mapping is None or not isinstance(values, list):
        return {}
    names = list(mapping.widgets)
    for index, name in enumerate(mapping.widgets):  # a dynamic combo's sub-widgets follow it, for its value
        options = mapping.dynamic.get(name)
        if options and index < len(values) and isinstance(values[index], str):
            names[index + 1:index + 1] = [f"{name}.{sub}" for sub in options.get(values[index], ())]
            break
    return {name: value for name, value in zip(names, values, strict=False) if not name.startswith("$")}


def _look(node: dict, offset: tuple[float, float]) -> dict[str, Any]:
    x, y = _pos(node)
    look: dict[str, Any] = {"pos": [round(x + offset[0]), round(y + offset[1])]}
    size = node.get("size")
    if isinstance(size, dict):
        size = [size.get("0"), size.get("1")]
    if isinstance(size, list) and len(size) >= 2 and all(isinstance(v, (int, float)) for v in size[:2]):
        look["size"] = [round(size[0]), round(size[1])]
    for key in ("color", "bgcolor"):
        if isinstance(node.get(key), str):
            look[key] = node[key]
    if isinstance(node.get("flags"), dict) and node["flags"].get("collapsed"):
        look["collapsed"] = True
    return look


def _groups(document: dict, flat: Flat) -> list[dict]:
    out = []
    groups = document.get("groups") if isinstance(document.get("groups"), list) else []
    for group in [*groups, *flat.groups]:
        bounding = group.get("bounding") if isinstance(group, dict) else None
        if not (isinstance(bounding, list) and len(bounding) == 4 and all(isinstance(v, (int, float)) for v in bounding)):
            continue
        dx, dy = group.get("$offset", (0, 0))
        entry = {"title": str(group.get("title") or "Group"),
                 "bounding": [round(bounding[0] + dx), round(bounding[1] + dy), round(bounding[2]), round(bounding[3])]}
        for key in ("color", "font_size"):
            if group.get(key) is not None:
                entry[key] = group[key]
        out.append(entry)
    return out


def ui_to_api(document: dict) -> tuple[dict[str, dict], dict[str, Any], list[str], dict[str, tuple]]:
    """(API-format nodes, ditgraph layout, notes, inlined subgraph instances) for an editor-format workflow."""
    check_document(document)
    defs: dict[str, Any] = {**_subgraphs(document), "$groups": _group_nodes(document)}
    flat = Flat()
    _add_graph(flat, document.get("nodes") or [], document.get("links") or [], "", {}, defs, 0)
    api: dict[str, dict] = {}
    looks: dict[str, dict] = {}
    for node_id, node in flat.nodes.items():
        kind = node.get("type")
        if not isinstance(kind, str) or kind in PASS_TYPES or kind in SKIPPED or node.get("mode") in (MUTED, BYPASS):
            continue
        inputs = _widget_inputs(node)
        for index, spec in enumerate(node.get("inputs") or []):
            name = (spec.get("widget") or {}).get("name") or spec.get("name")
            found = _resolve(flat, (node_id, index))
            if found is not None and isinstance(name, str):
                inputs[name] = list(found[1]) if found[0] == "link" else found[1]
        api[node_id] = {"class_type": kind, "inputs": inputs}
        if isinstance(node.get("title"), str) and node["title"]:
            api[node_id]["_meta"] = {"title": node["title"]}
        prefix = node_id.rsplit(":", 1)[0] + ":" if ":" in node_id else ""
        looks[node_id] = _look(node, flat.offsets.get(prefix, (0.0, 0.0)))
    layout: dict[str, Any] = {"nodes": looks, "groups": _groups(document, flat)}
    view = (document.get("extra") or {}).get("ds")
    if isinstance(view, dict) and isinstance(view.get("offset"), list) and isinstance(view.get("scale", 1), (int, float)):
        layout["viewport"] = {"offset": view["offset"][:2], "scale": view.get("scale", 1)}
    return api, layout, flat.inlined, flat.instances
