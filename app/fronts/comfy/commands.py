"""The CLI's ComfyUI commands: ``ditgraph import-comfy`` and ``ditgraph export-comfy``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _write(text: str, output: str | None, what: str) -> None:
    from app.core.workflow import atomic_write
    from app.fronts.cli import _err

    if output in (None, "-"):
        sys.stdout.write(text)
    else:
        atomic_write(output, text.encode("utf-8"))
        _err(f"wrote {output} ({what})")


def cmd_import_comfy(args) -> int:
    from app.core.workflow import Workflow, validate
    from app.fronts.cli import EXIT_OK, UsageError, _err, _problem_text, make_registry
    from app.fronts.comfy import ComfyImportError, EmbeddedWorkflowError, import_file

    registry = make_registry(args.plugin)
    try:
        document = import_file(args.file, registry, name=Path(args.file).stem)
    except FileNotFoundError:
        raise UsageError(f"file {args.file!r} does not exist") from None
    except (ComfyImportError, EmbeddedWorkflowError) as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc}") from None
    for note in document["meta"].get("import_notes", []):
        _err(f"note: {note}")
    for problem in validate(Workflow.from_dict(document), registry):
        _err("warning: " + _problem_text(args.output or "output", problem).split(": ", 1)[1]
             + " (fix it in the editor or with --set)")
    _write(json.dumps(document, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(document['nodes'])} nodes")
    return EXIT_OK


def cmd_export_comfy(args) -> int:
    from app.fronts.cli import EXIT_OK, UsageError, load_document
    from app.fronts.comfy.export import ComfyExportError, export_comfy

    try:
        prompt = export_comfy(load_document(args.workflow))
    except ComfyExportError as exc:
        raise UsageError(f"{args.workflow}: {exc}") from None
    _write(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(prompt)} ComfyUI nodes")
    return EXIT_OK


def add_commands(add) -> None:
    """Register the two commands with the CLI's subcommand factory."""
    comfy = add("import-comfy", "convert a ComfyUI workflow (editor or API format) into a ditgraph workflow")
    comfy.add_argument("file", metavar="FILE", help="a ComfyUI JSON file, or a PNG, WEBP, MP4 or WebM ComfyUI saved")
    comfy.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    comfy.set_defaults(handler=cmd_import_comfy)
    export = add("export-comfy", "convert a ditgraph workflow into ComfyUI's API format (for the types that map back)")
    export.add_argument("workflow", metavar="WORKFLOW", help="a ditgraph workflow file")
    export.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    export.set_defaults(handler=cmd_export_comfy)
