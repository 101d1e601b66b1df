"""ComfyUI interoperability: import (API and editor formats, files with embedded workflows) and export.

    convert(document, registry)            a ComfyUI workflow (either format) -> ditgraph workflow
    import_file(path_or_bytes, registry)   JSON, or a PNG/WEBP/MP4/WebM ComfyUI (or ditgraph) saved
    read_embedded_workflow(path_or_bytes)  the raw {"workflow": ..., "prompt": ...} a file carries
    export_comfy(workflow, registry)       ditgraph workflow -> ComfyUI API-format dict

The mapping table (``table.TABLE``) is documented in docs/comfy_import.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.workflow import FORMAT
from app.fronts.comfy import families, regroup
from app.fronts.comfy.api import convert_api, describe_missing, document_from_nodes, is_api_format, unmapped_types
from app.fronts.comfy.export import export_comfy
from app.fronts.comfy.metadata import EmbeddedWorkflowError, embedded_texts, parse_texts, read_embedded_workflow
from app.fronts.comfy.shape import check_api
from app.fronts.comfy.table import TABLE, ComfyImportError
from app.fronts.comfy.ui import is_ui_format, ui_to_api

__all__ = ["TABLE", "ComfyImportError", "EmbeddedWorkflowError", "convert", "embedded_texts", "export_comfy",
           "import_embedded", "import_file", "import_texts", "read_embedded_workflow", "to_api"]


def _parse(document: Any) -> tuple[dict[str, dict], dict[str, Any], list[str], dict[str, tuple]]:
    if isinstance(document, dict) and "prompt" in document and is_api_format(document["prompt"]):
        document = document["prompt"]  # the body of a POST /prompt call
    if isinstance(document, dict) and document.get("format") == FORMAT:
        raise ComfyImportError("this is already a ditgraph workflow")
    if is_ui_format(document):
        return ui_to_api(document)
    if is_api_format(document):
        check_api(document)
        return {str(k): v for k, v in document.items()}, {}, [], {}
    raise ComfyImportError("not a ComfyUI workflow: expected the editor format (nodes and links) or the API format "
                           '(node ids mapping to {"class_type": ..., "inputs": {...}})')


def to_api(document: Any) -> tuple[dict[str, dict], dict[str, Any], list[str]]:
    """(API-format nodes, layout, notes) for a ComfyUI document of either format (subgraphs inlined)."""
    api, layout, notes, _ = _parse(document)
    return api, layout, notes


def convert(document: Any, registry, name: str | None = None) -> dict:
    """A ditgraph workflow document from a ComfyUI one (editor or API format).

    Raises ComfyImportError with one line: a family ditgraph cannot run, or every unmapped
    node type (nothing is half-imported). ComfyUI subgraphs become ditgraph subgraphs where
    the workflow format has them, else they stay inlined (noted).
    """
    api, layout, notes, instances = _parse(document)
    if not api:
        raise ComfyImportError("the workflow has no nodes to import")
    families.check(api)
    missing = unmapped_types(api, registry)
    if missing:
        raise ComfyImportError(describe_missing(api, missing), unmapped=missing)
    notes = list(notes)
    if not regroup.SUPPORTED:
        notes += [f"subgraph {sub!r} (node {node_id}) was inlined: this ditgraph's workflow format has no subgraphs"
                  for node_id, (sub, _) in instances.items()]
    nodes = convert_api(api, registry, notes)
    converted = document_from_nodes(nodes, notes, name, layout)
    if regroup.SUPPORTED and instances:
        grouped = regroup.regroup(converted, instances, registry)
        converted["meta"]["import_notes"] = [*converted["meta"].get("import_notes", []), *grouped]
    return converted


def import_file(source: str | Path | bytes, registry, name: str | None = None) -> dict:
    """A ditgraph workflow from a ComfyUI JSON file or a PNG/WEBP/MP4/WebM with an embedded workflow."""
    return import_embedded(read_embedded_workflow(source), registry, name)


def import_texts(texts: dict[str, str], registry, name: str | None = None) -> dict:
    """The same from a file's metadata texts (the server reads those itself)."""
    return import_embedded(parse_texts(texts), registry, name)


def import_embedded(found: dict[str, Any], registry, name: str | None = None) -> dict:
    """From what ``read_embedded_workflow`` returned. A ditgraph workflow is returned as it is; of
    ComfyUI's two, the editor-format ``workflow`` is preferred (it keeps the layout), the
    API-format ``prompt`` is the fallback."""
    if "document" in found:
        document = found["document"]
        if isinstance(document, dict) and document.get("format") == FORMAT:
            return document
        return convert(document, registry, name)
    workflow = found.get("workflow")
    if isinstance(workflow, dict) and workflow.get("format") == FORMAT:
        return workflow
    if workflow is None:
        return convert(found["prompt"], registry, name)
    try:
        return convert(workflow, registry, name)
    except ComfyImportError:
        if "prompt" not in found:
            raise
        return convert(found["prompt"], registry, name)
