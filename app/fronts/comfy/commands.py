"""The CLI's ComfyUI commands: ``ditgraph import-comfy`` and ``ditgraph export-comfy``.

The handlers get the CLI module itself (``cli``) for its errors and helpers: under
``python -m app.fronts.cli`` that module is ``__main__``, whose UsageError is the one caught.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from types import ModuleType


def _write(cli: ModuleType, text: str, output: str | None, what: str) -> None:
    from app.core.workflow import atomic_write

    if output in (None, "-"):
        sys.stdout.write(text)
    else:
        atomic_write(output, text.encode("utf-8"))
        cli._err(f"wrote {output} ({what})")


def cmd_import_comfy(args, cli: ModuleType) -> int:
    from app.core.workflow import Workflow, validate
    from app.fronts.comfy import ComfyImportError, EmbeddedWorkflowError, import_file

    UsageError = cli.UsageError  # noqa: N806
    registry = cli.make_registry(args.plugin)
    try:
        document = import_file(args.file, registry, name=Path(args.file).stem)
    except FileNotFoundError:
        raise UsageError(f"file {args.file!r} does not exist") from None
    except (ComfyImportError, EmbeddedWorkflowError) as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc}") from None
    for note in document["meta"].get("import_notes", []):
        cli._err(f"note: {note}")
    for problem in validate(Workflow.from_dict(document), registry):
        cli._err("warning: " + cli._problem_text(args.output or "output", problem).split(": ", 1)[1]
                 + " (fix it in the editor or with --set)")
    _write(cli, json.dumps(document, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(document['nodes'])} nodes")
    return cli.EXIT_OK


def cmd_export_comfy(args, cli: ModuleType) -> int:
    from app.fronts.comfy.export import ComfyExportError, export_comfy

    try:
        prompt = export_comfy(cli.load_document(args.workflow))
    except ComfyExportError as exc:
        raise cli.UsageError(f"{args.workflow}: {exc}") from None
    _write(cli, json.dumps(prompt, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(prompt)} ComfyUI nodes")
    return cli.EXIT_OK


def add_commands(add, cli: ModuleType) -> None:
    """Register the two commands with the CLI's subcommand factory."""
    comfy = add("import-comfy", "convert a ComfyUI workflow (editor or API format) into a ditgraph workflow")
    comfy.add_argument("file", metavar="FILE", help="a ComfyUI JSON file, or a PNG, WEBP, MP4 or WebM ComfyUI saved")
    comfy.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    comfy.set_defaults(handler=partial(cmd_import_comfy, cli=cli))
    export = add("export-comfy", "convert a ditgraph workflow into ComfyUI's API format (for the types that map back)")
    export.add_argument("workflow", metavar="WORKFLOW", help="a ditgraph workflow file")
    export.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    export.set_defaults(handler=partial(cmd_export_comfy, cli=cli))
