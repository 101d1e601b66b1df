"""The ``ditgraph`` command: run, validate and explain workflows headless; serve the editor and API.

Exit codes: 0 ok, 1 a run failed, 2 invalid input or usage, 130 cancelled (Ctrl-C).
Errors print as one line each on stderr; ``--debug`` adds tracebacks. The commands live in
app.fronts.cli_run (run) and app.fronts.cli_commands (the others).
"""

from __future__ import annotations

import argparse
import os
import sys

from app.fronts.cli_commands import cmd_explain, cmd_models, cmd_nodes, cmd_serve, cmd_validate, cmd_version
from app.fronts.cli_inputs import add_engine_flags, add_memory_flags, make_registry
from app.fronts.cli_run import cmd_run
from app.fronts.cli_support import EXIT_CANCELLED, EXIT_FAILED, EXIT_INVALID, EXIT_OK, UsageError, capped, err
from app.fronts.comfy.commands import add_commands as add_comfy_commands

__all__ = ["build_parser", "main", "make_registry"]

EPILOG = f"""exit codes:
  0    success
  1    a run failed (a node raised; the message names the node)
  2    invalid input or usage: missing/unreadable file, bad JSON, invalid workflow,
       unknown --set target, a value of the wrong type, bad arguments
  130  cancelled (Ctrl-C; the run stops at the next step boundary)

environment: DITGRAPH_MODELS, DITGRAPH_INPUTS, DITGRAPH_OUTPUTS (folders), DITGRAPH_PLUGINS
(extra node modules or .py files, separated by '{os.pathsep}'), DITGRAPH_TOKEN (serve), DITGRAPH_DB (serve).
See docs/cli.md."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# -- the parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", metavar="MODULE",
                        help="extra node module (dotted name or .py file) to load; repeatable")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = _Parser(prog="ditgraph", description="Node-based workflows for diffusion transformers.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    _add_run(add)
    validate = add("validate", "check a workflow without running it; lists every problem")
    validate.add_argument("workflow", metavar="WORKFLOW")
    validate.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE")
    validate.add_argument("--target", action="append", metavar="NODE")
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(handler=cmd_validate)

    nodes = add("nodes", "list the node catalogue")
    nodes.add_argument("query", nargs="?", help="only nodes whose type, category or description contains this")
    nodes.add_argument("--json", action="store_true", help="the catalogue as served at /api/nodes")
    nodes.set_defaults(handler=cmd_nodes)

    serve = add("serve", "serve the editor UI and the HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--token", default=None, help="require this token on every request (or set DITGRAPH_TOKEN)")
    serve.add_argument("--allow-origin", action="append", metavar="ORIGIN", help="trust browser requests from this origin")
    serve.add_argument("--db", metavar="FILE", help="queue database (default: $DITGRAPH_DB or ~/ditgraph/queue.sqlite3)")
    serve.add_argument("--workflows-dir", metavar="DIR", help="user workflows (default: ~/ditgraph/workflows)")
    serve.add_argument("--output-dir", metavar="DIR")
    serve.add_argument("--input-dir", metavar="DIR")
    serve.add_argument("--models", metavar="DIR")
    serve.add_argument("--device", metavar="DEVICE")
    add_engine_flags(serve)
    serve.add_argument("--ray", metavar="ADDRESS", help="dispatch queued runs to Ray workers (one per GPU) of the "
                       "cluster at ADDRESS (HOST:PORT, or 'auto'); see docs/ray.md")
    serve.set_defaults(handler=cmd_serve)

    models = add("models", "list what the models folder holds, by kind")
    models.add_argument("--models", metavar="DIR")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    version = add("version", "print version information")
    version.add_argument("--json", action="store_true")
    version.set_defaults(handler=cmd_version)

    explain = add("explain", "show the execution order, why each node would run, and each loader's VRAM plan")
    explain.add_argument("workflow", metavar="WORKFLOW")
    explain.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE")
    explain.add_argument("--target", action="append", metavar="NODE")
    explain.add_argument("--server", metavar="URL", help="ask a running server (its memo cache) instead")
    explain.add_argument("--token", help="token for --server")
    explain.add_argument("--json", action="store_true")
    explain.add_argument("--device", metavar="DEVICE", help="plan for this device (cuda plans without a GPU here too)")
    explain.add_argument("--models", metavar="DIR", help="the models folder")
    add_memory_flags(explain)
    explain.set_defaults(handler=cmd_explain)

    add_comfy_commands(add, UsageError, make_registry)  # import-comfy, export-comfy
    return parser


def _add_run(add) -> None:
    run = add("run", "run a workflow file (as saved by the editor)")
    run.add_argument("workflow", metavar="WORKFLOW",
                     help="a workflow file, '-' for stdin, or the name of a workflow saved in the editor or shipped in graphs/")
    run.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                     help="override an input; the value is parsed by the input's declared type; repeatable")
    run.add_argument("--batch", metavar="FILE.jsonl",
                     help='one run per line, each an object of overrides {"NODE.INPUT": value}; '
                          "outputs of line k go to OUTPUT_DIR/batch-000k/")
    run.add_argument("--target", action="append", metavar="NODE", help="compute only this output node; repeatable")
    run.add_argument("--output-dir", metavar="DIR", help="where outputs go (default: $DITGRAPH_OUTPUTS or ~/ditgraph/output)")
    run.add_argument("--input-dir", metavar="DIR", help="where input images are read from")
    run.add_argument("--device", metavar="DEVICE", help="cuda, cuda:N or cpu (default: cuda if available)")
    run.add_argument("--models", metavar="DIR", help="the models folder (default: $DITGRAPH_MODELS or ~/ditgraph/models)")
    run.add_argument("--json", action="store_true", help="print events as JSON lines on stdout (machine-readable)")
    run.add_argument("--fast", action="store_true",
                     help="compile the transformer blocks (and quantize to fp8 where the GPU has it) after each loader")
    add_engine_flags(run)
    run.add_argument("--ray", metavar="ADDRESS", help="run on Ray workers (one per GPU) of the cluster at ADDRESS "
                     "(HOST:PORT, or 'auto': the one running here, else a new local one); a --batch fans out")
    run.set_defaults(handler=cmd_run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return EXIT_INVALID
        return args.handler(args)
    except UsageError as exc:
        for message in capped(exc.messages):
            err(f"error: {message}" if not message.startswith(("error:", "ditgraph")) else message)
        return EXIT_INVALID
    except KeyboardInterrupt:
        err("cancelled")
        return EXIT_CANCELLED
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if debug:
            raise
        err(f"error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
