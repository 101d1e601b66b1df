"""ComfyUI API-format workflows -> ditgraph workflows, through the mapping table.

    {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0], ...}, "_meta": {"title": "..."}}}

Each ComfyUI node becomes the ditgraph node :data:`TABLE` names (or several, or none when it
folds into its consumer); links ``["4", 1]`` become ``{"from": ["4", "text_encoder"]}``. A type
without a mapping, or whose ditgraph node is not installed, stops the import with every such
type listed. The UI (editor) format is first turned into this format by ``ui.py``.
"""

from __future__ import annotations

from typing import Any

from app.core.workflow import FORMAT, VERSION
from app.fronts.comfy.table import NO_OUTPUT, TABLE, ComfyImportError, Translate

# the ComfyUI nodes that only hand a MODEL on (for following ModelSampling* shifts to samplers)
_SHIFT_SETTERS = {"ModelSamplingSD3", "ModelSamplingAuraFlow"}
_MODEL_PASSING = {"LoraLoader", "LoraLoaderModelOnly", "ModelSamplingFlux", "ComfySwitchNode", "CFGNorm"}
_SHIFT_TAKERS = {"KSampler", "BasicScheduler", "KSamplerAdvanced"}


def is_api_format(document: Any) -> bool:
    return isinstance(document, dict) and bool(document) and all(
        isinstance(v, dict) and "class_type" in v for v in document.values()
    )


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def sampler_shifts(document: dict) -> dict[str, float]:
    """ComfyUI sets the flow shift on the MODEL (ModelSamplingSD3/AuraFlow); ours is a sampler
    input: the shift each sampler/scheduler downstream of such a node should get."""
    consumers: dict[str, list[str]] = {}
    for node_id, raw in document.items():
        for value in (raw.get("inputs") or {}).values():
            if is_link(value) and value[1] == 0:
                consumers.setdefault(str(value[0]), []).append(str(node_id))
    shifts: dict[str, float] = {}
    for node_id, raw in document.items():
        shift = (raw.get("inputs") or {}).get("shift")
        if raw.get("class_type") not in _SHIFT_SETTERS or isinstance(shift, bool) or not isinstance(shift, (int, float)):
            continue
        stack, seen = [str(node_id)], set()
        while stack:
            for consumer in consumers.get(stack.pop(), []):
                kind = (document.get(consumer) or {}).get("class_type")
                if consumer in seen:
                    continue
                seen.add(consumer)
                if kind in _SHIFT_TAKERS or kind in ("CFGGuider", "BasicGuider"):
                    shifts[consumer] = float(shift)
                if kind in _MODEL_PASSING or kind in ("CFGGuider", "BasicGuider"):
                    stack.append(consumer)
    return shifts


class Context:
    """What expand functions need: resolve inputs to our values, follow links, take notes."""

    def __init__(self, document: dict, notes: list[str]):
        self.document, self.notes, self.shifts = document, notes, sampler_shifts(document)
        self.overrides: dict[tuple[str, str], Any] = {}  # (consumer, our input) -> value set by another node

    def override(self, consumer_id: str, name: str, value: Any) -> None:
        """Give ``consumer_id`` this value for input ``name`` (ControlNet: the sampler gets the patched model)."""
        self.overrides[(consumer_id, name)] = value

    def _node(self, source_id: Any) -> tuple[str, dict] | None:
        raw = self.document.get(str(source_id), self.document.get(source_id))
        return (str(source_id), raw) if raw is not None else None

    def fail(self, node_id: str, raw: dict, reason: str):
        raise ComfyImportError(f"node {node_id} ({raw.get('class_type')}): {reason}")

    def note(self, node_id: str, raw: dict, text: str) -> None:
        self.notes.append(f"node {node_id} ({raw.get('class_type')}): {text}")

    def shift(self, node_id: str) -> float | None:
        return self.shifts.get(node_id)

    def upstream(self, node_id: str, raw: dict, name: str) -> tuple[str, dict]:
        value = (raw.get("inputs") or {}).get(name)
        found = self._node(value[0]) if is_link(value) else None
        if found is None:
            self.fail(node_id, raw, f"its input {name!r} is not linked to a node")
        return found

    def value(self, node_id: str, raw: dict, name: str, default: Any = None) -> Any:
        """Our value for ComfyUI input ``name``: a constant, or a link following pass-through nodes."""
        value = (raw.get("inputs") or {}).get(name, default)
        return self.link(node_id, name, value) if is_link(value) else value

    def constant(self, node_id: str, raw: dict, name: str, default: Any = None) -> Any:
        """Like ``value``, but a link from a primitive node gives that node's value."""
        value = self.value(node_id, raw, name, default)
        source = self._node(value["from"][0]) if isinstance(value, dict) and "from" in value else None
        if source and str(source[1].get("class_type")).startswith("Primitive"):
            return (source[1].get("inputs") or {}).get("value", value)
        return value

    def translate(self, node_id: str, raw: dict, name: str, translate: Translate) -> Any:
        value = self.value(node_id, raw, name)
        if isinstance(value, dict):
            return value
        ours, note = translate(value)
        if note:
            self.note(node_id, raw, note)
        return ours

    def link(self, node_id: str, name: str, value: list, depth: int = 0) -> Any:
        found = self._node(value[0])
        if found is None:
            raise ComfyImportError(f"node {node_id}: input {name!r} links to node {value[0]}, which does not exist")
        source_id, source = found
        mapping = TABLE[source["class_type"]]
        through = mapping.passthrough.get(value[1]) or (mapping.select(source) if mapping.select else None)
        if through is not None and depth < 100:
            upstream = (source.get("inputs") or {}).get(through)
            if not is_link(upstream):
                return upstream  # a constant reaches the consumer directly
            return self.link(source_id, through, upstream, depth + 1)
        if mapping.folded:
            raise ComfyImportError(f"node {node_id}: input {name!r} takes the output of node {source_id} "
                                   f"({source['class_type']}), which ditgraph folds into samplers only")
        if not 0 <= value[1] < len(mapping.outputs):
            raise ComfyImportError(f"node {node_id}: input {name!r} links to output {value[1]} of node "
                                   f"{source_id} ({source['class_type']}), which has {len(mapping.outputs)} output(s) here")
        return _output(node_id, name, source_id, source, mapping.outputs[value[1]])


def _output(node_id: str, name: str, source_id: str, source: dict, output: str) -> dict:
    """Our link for a ComfyUI output: "!why" is an output ours lacks, ".N/name" one of the node <id>.N."""
    if output.startswith(NO_OUTPUT):
        raise ComfyImportError(f"node {node_id}: input {name!r} takes an output of node {source_id} "
                               f"({source['class_type']}) that ditgraph lacks: {output[1:]}")
    if output.startswith(".") and "/" in output:
        suffix, output = output.split("/", 1)
        return {"from": [source_id + suffix, output]}
    return {"from": [source_id, output]}


def unmapped_types(document: dict, registry) -> list[str]:
    """The ComfyUI types in API-format ``document`` that this installation cannot import."""
    missing = set()
    for raw in document.values():
        mapping = TABLE.get(raw.get("class_type"))
        if mapping is not None and mapping.select and mapping.select(raw):
            continue  # dissolves into the chosen branch: needs no node of ours
        needed = [] if mapping is None else [t for t in (mapping.target, *mapping.creates) if t is not None]
        if mapping is None or any(registry.get(t) is None for t in needed):
            missing.add(str(raw.get("class_type")))
    return sorted(missing)


def describe_missing(document: dict, missing: list[str]) -> str:
    """One line listing each unmapped type with its node ids and, when known, what would provide it."""
    parts = []
    for kind in missing:
        ids = sorted(str(k) for k, v in document.items() if str(v.get("class_type")) == kind)
        mapping = TABLE.get(kind)
        need = f" needs ditgraph's {mapping.target} node ({mapping.requires or 'not installed'})" if mapping else ""
        parts.append(f"{kind} (node {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}){need}")
    return (f"{len(missing)} ComfyUI node type(s) have no ditgraph equivalent here: {'; '.join(parts)}. "
            "See docs/comfy_import.md for the supported types.")


def _convert_inputs(node_id: str, raw: dict, nd, ctx: Context) -> dict[str, Any]:
    mapping = TABLE[raw["class_type"]]
    inputs: dict[str, Any] = {}
    for comfy_name, value in (raw.get("inputs") or {}).items():
        ours = mapping.inputs.get(comfy_name, comfy_name)
        if comfy_name in mapping.drop:
            continue
        if ours not in nd.inputs:
            ctx.note(node_id, raw, f"input {comfy_name!r} has no counterpart in {mapping.target}; dropped")
            continue
        if is_link(value):
            inputs[ours] = ctx.link(node_id, comfy_name, value)
        else:
            translate = mapping.values.get(ours)
            if translate:
                value, note = translate(value)
                if note:
                    ctx.note(node_id, raw, note)
            inputs[ours] = value
    return inputs


def convert_api(document: dict, registry, notes: list[str]) -> dict[str, dict]:
    """Our ``nodes`` for an API-format document (types already checked against the table)."""
    ctx = Context(document, notes)
    nodes: dict[str, dict] = {}
    for node_id, raw in document.items():
        node_id, mapping = str(node_id), TABLE[raw["class_type"]]
        if not isinstance(raw.get("inputs") or {}, dict):
            raise ComfyImportError(f"node {node_id}: 'inputs' must be an object")
        if mapping.note:
            ctx.note(node_id, raw, mapping.note)
        if mapping.target is None or (mapping.select and mapping.select(raw)):  # consumers are linked past it
            continue
        target = mapping.pick(raw) if mapping.pick else mapping.target
        if mapping.expand is not None:
            extra, inputs = mapping.expand(node_id, raw, ctx)
            nodes.update(extra)
        else:
            inputs = _convert_inputs(node_id, raw, registry.get(target), ctx)
        if ctx.shift(node_id) is not None and "shift" in registry.get(target).inputs:
            inputs.setdefault("shift", ctx.shift(node_id))
        entry: dict[str, Any] = {"type": target, "inputs": {k: v for k, v in inputs.items() if v is not None}}
        title = (raw.get("_meta") or {}).get("title") if isinstance(raw.get("_meta"), dict) else None
        if isinstance(title, str) and title and title != raw["class_type"]:
            entry["title"] = title
        nodes[node_id] = entry
    _apply_overrides(nodes, ctx)
    for node_id, raw in document.items():
        fixup = TABLE[raw["class_type"]].fixup
        if fixup is not None and str(node_id) in nodes:
            fixup(str(node_id), nodes, notes, set(registry.nodes))
    return nodes


def _apply_overrides(nodes: dict[str, dict], ctx: Context) -> None:
    """Overrides aimed at a folded guider go to the sampler that took its inputs."""
    for (consumer, name), value in ctx.overrides.items():
        targets = [consumer] if consumer in nodes else [
            node_id for node_id, raw in ctx.document.items()
            if any(is_link(v) and str(v[0]) == consumer for v in (raw.get("inputs") or {}).values()) and node_id in nodes]
        for target in targets:
            nodes[target]["inputs"][name] = value


def auto_layout(nodes: dict[str, dict], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Positions for nodes without one: columns by depth, rows in id order (or beside their parent)."""
    layout = dict(known or {})
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: frozenset) -> int:
        if node_id in depth or node_id in trail:
            return depth.get(node_id, 0)  # a cycle: validation reports it
        parents = [v["from"][0] for v in nodes[node_id]["inputs"].values() if isinstance(v, dict) and "from" in v]
        depth[node_id] = 1 + max((visit(p, trail | {node_id}) for p in parents if p in nodes), default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    for node_id in sorted(nodes, key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k)):
        parent = node_id.rsplit(".", 1)[0]
        if node_id in layout:
            continue
        if parent != node_id and parent in layout:  # a node an expansion added: just left of its origin
            x, y = layout[parent]["pos"]
            layout[node_id] = {"pos": [x - 300, y + 120 * int(node_id.rsplit(".", 1)[1])]}
            continue
        column = visit(node_id, frozenset())
        rows[column] = rows.get(column, 0) + 1
        layout[node_id] = {"pos": [40 + 340 * column, 40 + 220 * (rows[column] - 1)]}
    return {k: v for k, v in layout.items() if k in nodes}


def document_from_nodes(nodes: dict, notes: list[str], name: str | None, layout: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name or "imported from ComfyUI", "imported_from": "comfyui"}
    if notes:
        meta["import_notes"] = notes
    layout = dict(layout or {})
    layout["nodes"] = auto_layout(nodes, layout.get("nodes"))
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "layout": layout, "meta": meta}
