"""The CLI's ComfyUI commands: ``ditgraph import-comfy`` and ``ditgraph export-comfy``.

The CLI passes its own UsageError and make_registry (under ``python -m app.fronts.cli`` the
CLI module is ``__main__``, and only its UsageError is caught as a usage error).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _write(text: str, output: str | None, what: str) -> None:
    from app.core.workflow import atomic_write

    if output in (None, "-"):
        sys.stdout.write(text)
    else:
        atomic_write(output, text.encode("utf-8"))
        _say(f"wrote {output} ({what})")


def cmd_import_comfy(args, usage_error: type[Exception], make_registry: Callable) -> int:
    from app.core.workflow import Workflow, validate
    from app.fronts.comfy import ComfyImportError, EmbeddedWorkflowError, import_file

    registry = make_registry(args.plugin)
    try:
        document = import_file(args.file, registry, name=Path(args.file).stem)
    except FileNotFoundError:
        raise usage_error(f"file {args.file!r} does not exist") from None
    except (ComfyImportError, EmbeddedWorkflowError) as exc:
        raise usage_error(f"{args.file}: {exc}") from None
    except OSError as exc:
        raise usage_error(f"cannot read {args.file!r}: {exc}") from None
    for note in document["meta"].get("import_notes", []):
        _say(f"note: {note}")
    for problem in validate(Workflow.from_dict(document), registry):
        where = ", ".join(part for part in (problem.node and f"node {problem.node}",
                                            problem.input and f"input {problem.input!r}") if part)
        _say(f"warning: {where + ': ' if where else ''}{problem.message} (fix it in the editor or with --set)")
    _write(json.dumps(document, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(document['nodes'])} nodes")
    return 0


def cmd_export_comfy(args, usage_error: type[Exception], make_registry: Callable) -> int:
    from app.core.workflow import WorkflowError, load
    from app.fronts.comfy.export import ComfyExportError, export_comfy

    try:
        prompt = export_comfy(load(args.workflow).to_dict())
    except WorkflowError as exc:
        raise usage_error(*(f"{args.workflow}: {problem.message}" for problem in exc.problems)) from None
    except ComfyExportError as exc:
        raise usage_error(f"{args.workflow}: {exc}") from None
    _write(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n", args.output, f"{len(prompt)} ComfyUI nodes")
    return 0


def add_commands(add: Callable, usage_error: type[Exception], make_registry: Callable) -> None:
    """Register the two commands with the CLI's subcommand factory ``add(name, help)``."""
    given = {"usage_error": usage_error, "make_registry": make_registry}
    comfy = add("import-comfy", "convert a ComfyUI workflow (editor or API format) into a ditgraph workflow")
    comfy.add_argument("file", metavar="FILE", help="a ComfyUI JSON file, or a PNG, WEBP, MP4 or WebM ComfyUI saved")
    comfy.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    comfy.set_defaults(handler=partial(cmd_import_comfy, **given))
    export = add("export-comfy", "convert a ditgraph workflow into ComfyUI's API format (for the types that map back)")
    export.add_argument("workflow", metavar="WORKFLOW", help="a ditgraph workflow file")
    export.add_argument("-o", "--output", metavar="OUT.json", help="write here (default: stdout)")
    export.set_defaults(handler=partial(cmd_export_comfy, **given))
