"""Shape checks for editor-format documents: a malformed file is refused in one line, not a traceback.

Only what the import relies on is checked (ComfyUI's editors add many optional keys). Entries
that only decorate (groups, positions, sizes, colours) are skipped when malformed instead.
"""

from __future__ import annotations

from typing import Any

from app.fronts.comfy.table import ComfyImportError


def _fail(what: str) -> None:
    raise ComfyImportError(f"not a readable ComfyUI editor workflow: {what}")


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_slot(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _slots(node: dict, key: str) -> None:
    slots = node.get(key)
    if slots is None:
        return
    if not isinstance(slots, list) or not all(isinstance(s, dict) for s in slots):
        _fail(f"node {node['id']}: {key!r} is not a list of slots")
    for slot in slots:
        if slot.get("widget") is not None and not isinstance(slot["widget"], dict):
            _fail(f"node {node['id']}: an input's 'widget' is not an object")


def check_nodes(nodes: Any, where: str = "") -> None:
    if not isinstance(nodes, list):
        _fail(f"{where}'nodes' is not a list")
    for node in nodes:
        if not isinstance(node, dict) or not _is_id(node.get("id")) or not isinstance(node.get("type"), str):
            _fail(f"{where}a node without an id and a type: {str(node)[:80]}")
        _slots(node, "inputs")
        _slots(node, "outputs")
        if node.get("widgets_values") is not None and not isinstance(node["widgets_values"], (list, dict)):
            _fail(f"node {node['id']}: 'widgets_values' is neither a list nor an object")
        if node.get("flags") is not None and not isinstance(node["flags"], dict):
            _fail(f"node {node['id']}: 'flags' is not an object")


def check_links(links: Any, where: str = "", width: int = 5) -> None:
    """Links are [id, origin, slot, target, slot, type] lists (group nodes: without the id) or objects."""
    if not isinstance(links, list):
        _fail(f"{where}'links' is not a list")
    for link in links:
        if isinstance(link, dict):
            ends = [link.get("origin_id"), link.get("origin_slot"), link.get("target_id"), link.get("target_slot")]
        elif isinstance(link, list) and len(link) >= width - 1:
            ends = link[width - 4:width]
        else:
            ends = []
        if len(ends) != 4 or not (_is_id(ends[0]) and _is_slot(ends[1]) and _is_id(ends[2]) and _is_slot(ends[3])):
            _fail(f"{where}a malformed link: {str(link)[:80]}")


def _check_subgraph(sub: Any) -> None:
    if not isinstance(sub, dict) or not isinstance(sub.get("id"), str):
        _fail("a subgraph definition without an id")
    where = f"subgraph {sub['id']}: "
    check_nodes(sub.get("nodes") or [], where)
    check_links(sub.get("links") or [], where)
    for key in ("inputs", "outputs"):
        if not isinstance(sub.get(key) or [], list) or not all(isinstance(s, dict) for s in sub.get(key) or []):
            _fail(f"{where}{key!r} is not a list")
    for key in ("inputNode", "outputNode"):
        if sub.get(key) is not None and not isinstance(sub[key], dict):
            _fail(f"{where}{key!r} is not an object")


def check_document(document: dict) -> None:
    """Raise ComfyImportError naming the first structural problem the import would trip on."""
    check_nodes(document.get("nodes"))
    check_links(document.get("links") or [])
    definitions = document.get("definitions") or {}
    if not isinstance(definitions, dict) or not isinstance(definitions.get("subgraphs") or [], list):
        _fail("'definitions' is not an object with a list of subgraphs")
    for sub in definitions.get("subgraphs") or []:
        _check_subgraph(sub)
    extra = document.get("extra") or {}
    if not isinstance(extra, dict) or not isinstance(extra.get("groupNodes") or {}, dict):
        _fail("'extra' is not an object (with 'groupNodes' an object)")
    for name, group in (extra.get("groupNodes") or {}).items():
        if not isinstance(group, dict):
            _fail(f"group node {name!r} is not an object")
        check_nodes([{"id": n.get("index"), **n} if isinstance(n, dict) else n for n in group.get("nodes") or []],
                    f"group node {name!r}: ")
        check_links(group.get("links") or [], f"group node {name!r}: ", width=4)


def check_api(document: dict) -> None:
    """API format: every node has a string class_type and an object of inputs."""
    for node_id, raw in document.items():
        if not isinstance(raw.get("class_type"), str):
            _fail_api(f"node {node_id}: 'class_type' is not a string")
        if not isinstance(raw.get("inputs", {}), dict):
            _fail_api(f"node {node_id}: 'inputs' is not an object")
        if not isinstance(raw.get("_meta", {}), dict):
            _fail_api(f"node {node_id}: '_meta' is not an object")


def _fail_api(what: str) -> None:
    raise ComfyImportError(f"not a readable ComfyUI API-format workflow: {what}")
