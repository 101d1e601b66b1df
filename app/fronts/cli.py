"""The ``ditgraph`` command: run, validate and explain workflows headless; serve the editor and API.

Exit codes: 0 ok, 1 a run failed, 2 invalid input or usage, 130 cancelled (Ctrl-C).
Errors print as one line each on stderr; ``--debug`` adds tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import app as app_package

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130

EPILOG = f"""exit codes:
  0    success
  1    a run failed (a node raised; the message names the node)
  2    invalid input or usage: missing/unreadable file, bad JSON, invalid workflow,
       unknown --set target, a value of the wrong type, bad arguments
  130  cancelled (Ctrl-C; the run stops at the next step boundary)

environment: DITGRAPH_MODELS, DITGRAPH_INPUTS, DITGRAPH_OUTPUTS (folders), DITGRAPH_PLUGINS
(extra node modules or .py files, separated by '{os.pathsep}'), DITGRAPH_TOKEN (serve), DITGRAPH_DB (serve).
See docs/cli.md."""


class UsageError(Exception):
    """Bad input from the user: printed as one line per message, exit code 2."""

    def __init__(self, *messages: str):
        self.messages = [m for m in messages if m]
        super().__init__("\n".join(self.messages))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# -- node modules -------------------------------------------------------------------------------------

_plugin_modules: dict[str, Any] = {}


def _import_plugin(spec: str) -> Any:
    if spec in _plugin_modules:
        return _plugin_modules[spec]
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"plugin file {spec!r} does not exist")
        name = "ditgraph_plugin_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    _plugin_modules[spec] = module
    return module


def make_registry(plugins: list[str] | None = None):
    """The node library, installed plugins, and extra node modules named by --plugin / DITGRAPH_PLUGINS."""
    from app.core.registry import Registry

    registry = Registry()
    registry.load_package("nodes")
    registry.load_plugins()
    specs = [p for p in os.environ.get("DITGRAPH_PLUGINS", "").split(os.pathsep) if p.strip()] + list(plugins or [])
    for spec in specs:
        try:
            registry.add_module(_import_plugin(spec.strip()))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot load node plugin {spec!r}: {type(exc).__name__}: {exc}") from None
    return registry


# -- --set and --batch ------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


def coerce_value(raw: str, decl, where: str) -> Any:
    """Parse a --set value by the input's declared type (INT/FLOAT/BOOLEAN/STRING; JSON otherwise)."""
    from app.core.types import ANY, BOOLEAN, FLOAT, INT, STRING

    text = raw.strip()
    if decl.type == STRING:
        return raw
    if decl.type == INT:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{where}: {decl.name!r} is an integer (INT); {raw!r} is not one") from None
    if decl.type == FLOAT:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{where}: {decl.name!r} is a number (FLOAT); {raw!r} is not one") from None
    if decl.type == BOOLEAN:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UsageError(f"{where}: {decl.name!r} is true/false (BOOLEAN); {raw!r} is neither")
    try:
        return json.loads(text)
    except ValueError:
        if decl.type == ANY:
            return raw  # an any-typed input takes plain text as a string
        raise UsageError(f"{where}: {decl.name!r} takes a {decl.type} link; give it as JSON, "
                         f'e.g. {{"from": ["NODE", "OUTPUT"]}}') from None


def _declaration(document: dict, registry, node_id: str, input_name: str, where: str):
    nodes = document.get("nodes") or {}
    if node_id not in nodes:
        known = ", ".join(sorted(nodes, key=_natural)[:30]) or "none"
        raise UsageError(f"{where}: there is no node {node_id!r} in the workflow (its nodes: {known})")
    node_type = nodes[node_id].get("type")
    nd = registry.get(node_type)
    if nd is None:
        raise UsageError(f"{where}: node {node_id} has the unknown type {node_type!r}")
    decl = nd.inputs.get(input_name)
    if decl is None:
        raise UsageError(f"{where}: {node_type} (node {node_id}) has no input {input_name!r} "
                         f"(its inputs: {', '.join(nd.inputs) or 'none'})")
    return decl


def _split_target(target: str, where: str) -> tuple[str, str]:
    if "." not in target:
        raise UsageError(f"{where}: expected NODE.INPUT, e.g. 3.steps")
    node_id, input_name = target.rsplit(".", 1)
    if not node_id or not input_name:
        raise UsageError(f"{where}: expected NODE.INPUT, e.g. 3.steps")
    return node_id, input_name


def apply_sets(document: dict, registry, assignments: list[str]) -> dict:
    """Apply ``--set NODE.INPUT=VALUE`` overrides to a workflow document (in place)."""
    problems: list[str] = []
    for assignment in assignments:
        where = f"--set {assignment}"
        try:
            if "=" not in assignment:
                raise UsageError(f"{where}: expected NODE.INPUT=VALUE, e.g. 3.steps=20")
            target, raw = assignment.split("=", 1)
            node_id, input_name = _split_target(target.strip(), where)
            decl = _declaration(document, registry, node_id, input_name, where)
            document["nodes"][node_id].setdefault("inputs", {})[input_name] = coerce_value(raw, decl, where)
        except UsageError as exc:
            problems.extend(exc.messages)
    if problems:
        raise UsageError(*problems)
    return document


def apply_overrides(document: dict, registry, overrides: dict, where: str) -> dict:
    """Apply one batch line ({"NODE.INPUT": value}) to a document (in place)."""
    from app.core.types import STRING

    problems: list[str] = []
    for target, value in overrides.items():
        try:
            node_id, input_name = _split_target(str(target), f"{where}: {target!r}")
            decl = _declaration(document, registry, node_id, input_name, f"{where}: {target!r}")
            if isinstance(value, str) and decl.is_widget and decl.type != STRING:
                value = coerce_value(value, decl, f"{where}: {target!r}")
            document["nodes"][node_id].setdefault("inputs", {})[input_name] = value
        except UsageError as exc:
            problems.extend(exc.messages)
    if problems:
        raise UsageError(*problems)
    return document


def read_batch(path: str) -> list[tuple[int, dict]]:
    """(line number, overrides) for each non-blank line of a JSONL file; '#' lines are comments."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"batch file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read batch file {path!r}: {exc}") from None
    entries, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc})")
            continue
        if not isinstance(value, dict):
            problems.append(f'{path}:{number}: each line must be an object like {{"3.seed": 7}}')
            continue
        entries.append((number, value))
    if problems:
        raise UsageError(*problems)
    if not entries:
        raise UsageError(f"batch file {path!r} has no runs in it")
    return entries


def _problem_text(where: str, problem) -> str:
    """``error: WHERE: node 3, input 'steps': reason`` (the severity leads)."""
    text = str(problem)
    severity, _, rest = text.partition(": ")
    return f"{severity}: {where}: {rest}"


def _natural(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


# -- loading workflows ------------------------------------------------------------------------------------


def workflow_search_dirs() -> list[Path]:
    """Where a bare workflow name is looked up: the editor's saved workflows, then the shipped graphs/."""
    from app.core import paths

    user = Path(os.environ.get("DITGRAPH_WORKFLOWS") or Path.home() / "ditgraph" / "workflows").expanduser()
    return [user, paths.REPO_ROOT / "graphs"]


def resolve_workflow_path(name: str) -> str:
    """``name`` itself if it is a file; else a workflow of that name saved by the editor or shipped."""
    if name == "-" or Path(name).exists() or "/" in name or os.sep in name:
        return name
    filename = name if name.endswith(".json") else name + ".json"
    for folder in workflow_search_dirs():
        if (folder / filename).is_file():
            return str(folder / filename)
    return name


def load_document(path: str) -> dict:
    """A workflow file (or ``-`` for stdin, or the name of a saved/shipped workflow) as a migrated
    document; UsageError naming the problem otherwise."""
    from app.core.workflow import WorkflowError, load, loads

    try:
        if path == "-":
            return loads(sys.stdin.read()).to_dict()
        return load(resolve_workflow_path(path)).to_dict()
    except WorkflowError as exc:
        raise UsageError(*(_problem_text(path, p) for p in exc.problems)) from None


def _validated(document: dict, registry, where: str, targets: list[str] | None = None):
    from app.core.workflow import Workflow, WorkflowError, errors, validate

    try:
        workflow = Workflow.from_dict(document)
    except WorkflowError as exc:
        raise UsageError(*(_problem_text(where, p) for p in exc.problems)) from None
    problems = validate(workflow, registry, targets)
    bad = errors(problems)
    if bad:
        raise UsageError(*(_problem_text(where, p) for p in bad))
    return workflow, [p for p in problems if p.severity != "error"]


# -- progress on a terminal ---------------------------------------------------------------------------------


class ProgressLine:
    """One self-updating status line on stderr (only on a TTY)."""

    def __init__(self, stream, label: str = ""):
        self.stream = stream
        self.label = label
        self.total_nodes = 0
        self.done_nodes = 0
        self.node = ""
        self.last_draw = 0.0
        self.visible = False

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "run_started":
            self.total_nodes = len(event.get("nodes") or [])
            self.done_nodes = 0
            self.draw("starting", force=True)
        elif kind == "node_started":
            self.node = f"{event.get('node')} {event.get('node_type', '')}".strip()
            self.draw("", force=True)
        elif kind in ("node_finished", "node_cached"):
            self.done_nodes += 1
            self.draw("", force=True)
        elif kind == "progress":
            step, total = event.get("step", 0), max(1, event.get("total") or 1)
            width = 24
            filled = int(width * step / total)
            eta = event.get("eta")
            self.draw(f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"
                      + (f" ETA {eta:.0f}s" if isinstance(eta, (int, float)) else ""))
        elif kind in ("run_finished", "run_failed", "run_cancelled"):
            self.clear()

    def draw(self, detail: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        text = f"{self.label}nodes {self.done_nodes}/{self.total_nodes} {self.node} {detail}".rstrip()
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self.visible = True

    def clear(self) -> None:
        if self.visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.visible = False


# -- commands ------------------------------------------------------------------------------------------------


def _print(*parts: Any) -> None:
    print(*parts, flush=True)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _configure_paths(args) -> None:
    from app.core import paths

    models = getattr(args, "models", None)
    if models and not Path(models).expanduser().is_dir():
        raise UsageError(f"--models {models!r} is not a folder")
    paths.configure(models=models, outputs=getattr(args, "output_dir", None), inputs=getattr(args, "input_dir", None))


def _check_device(device: str | None) -> str | None:
    if device is None:
        return None
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (use cuda, cuda:1 or cpu)") from None
    return device


def _saved_files(ui: dict, out_root: Path) -> list[str]:
    from app.runs.queue import file_locations

    return [str(target) for _entry, _kind, target in file_locations(ui, out_root)]


def _run_one(engine, workflow, targets, out_dir: Path, out_root: Path, json_mode: bool, label: str,
             batch: int | None, debug: bool = False) -> str:
    """Run one workflow with Ctrl-C cancelling it; returns the final status."""
    from app.core.workflow import WorkflowError
    from app.runs.queue import annotate_files, jsonable_event, make_jsonable

    cancel = threading.Event()
    holder: dict[str, Any] = {}
    progress = ProgressLine(sys.stderr, label) if (not json_mode and sys.stderr.isatty()) else None

    def on_event(event: dict) -> None:
        if event.get("type") == "node_finished" and event.get("ui"):
            annotate_files(event["ui"], out_dir, out_root)
        if json_mode:
            data = jsonable_event(event)
            if batch is not None:
                data["batch"] = batch
            _emit_json(data)
        elif progress is not None:
            progress(event)

    done = threading.Event()

    def work() -> None:
        try:
            holder["result"] = engine.run(workflow, targets, cancel=cancel, on_event=on_event, output_dir=out_dir)
        except BaseException as exc:  # handed to the main thread
            holder["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=work, name="ditgraph-cli-run", daemon=True)
    thread.start()
    interrupted = False
    # wait on an Event, not Thread.join: a join interrupted by Ctrl-C can report the thread dead too early
    while not done.is_set():
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            if interrupted:
                _err("interrupted again: exiting without waiting")
                os._exit(EXIT_CANCELLED)
            interrupted = True
            cancel.set()
            _err("\ncancelling at the next step boundary (Ctrl-C again to quit now)")
    if progress is not None:
        progress.clear()
    if "error" in holder:
        error = holder["error"]
        if isinstance(error, WorkflowError):
            raise UsageError(*(str(p) for p in error.problems))
        raise error
    result = holder["result"]
    files = _saved_files(result.ui, out_root)
    if json_mode:
        data = {"type": "result", "run_id": result.run_id, "status": result.status, "executed": result.executed,
                "cached": result.cached, "duration": round(result.duration, 4), "ui": make_jsonable(result.ui),
                "error": result.error and {k: v for k, v in result.error.items() if k != "detail"},
                "files": files, "output_dir": str(out_dir)}
        if batch is not None:
            data["batch"] = batch
        _emit_json(data)
        return result.status
    if result.status == "success":
        _print(f"{label}ok: {len(result.executed)} node(s) ran, {len(result.cached)} cached, {result.duration:.2f} s")
        for file in files:
            _print(f"{label}saved {file}")
        for node_id, ui in result.ui.items():
            for text in (ui or {}).get("text", []) if isinstance(ui, dict) else []:
                _print(f"{label}node {node_id}: {text}")
    elif result.status == "failed":
        _err(f"{label}error: {result.error['message']}")
        if debug and result.error.get("detail"):
            _err(result.error["detail"])
    else:
        _err(f"{label}cancelled")
    return result.status


def cmd_run(args) -> int:
    _configure_paths(args)
    registry = make_registry(args.plugin)
    document = load_document(args.workflow)
    apply_sets(document, registry, args.set or [])
    targets = args.target or None
    variants: list[tuple[int | None, dict]] = []
    if args.batch:
        problems = []
        for number, overrides in read_batch(args.batch):
            where = f"{args.batch}:{number}"
            try:
                variant = apply_overrides(json.loads(json.dumps(document)), registry, overrides, where)
                _validated(variant, registry, where, targets)
                variants.append((number, variant))
            except UsageError as exc:
                problems.extend(exc.messages)
        if problems:
            raise UsageError(*problems)
    else:
        variants.append((None, document))
    workflows = []
    for number, variant in variants:
        workflow, warnings = _validated(variant, registry, args.workflow if number is None else f"{args.batch}:{number}",
                                        targets)
        workflows.append((number, workflow))
        if number is None or number == variants[0][0]:
            for warning in warnings:
                _err(_problem_text(args.workflow, warning))
    if args.ray:  # Ray is imported only here
        from app.core import paths
        from app.runs.ray_pool import run_workflows

        out_root = Path(args.output_dir).expanduser() if args.output_dir else paths.output_dir()
        return run_workflows(args.ray, registry, workflows, targets, out_root, json_mode=args.json, device=args.device,
                             debug=args.debug)
    device = _check_device(args.device)

    from app.core import paths
    from app.core.executor import Engine

    out_root = Path(args.output_dir).expanduser() if args.output_dir else paths.output_dir()
    engine = Engine(registry, device=device, output_dir=out_root)
    statuses = []
    for number, workflow in workflows:
        out_dir = out_root if number is None else out_root / f"batch-{number:04d}"
        label = "" if number is None or args.json else f"[line {number}] "
        status = _run_one(engine, workflow, targets, out_dir, out_root, args.json, label, number, args.debug)
        statuses.append(status)
        if status == "cancelled":
            break
    if "cancelled" in statuses:
        return EXIT_CANCELLED
    if "failed" in statuses:
        if len(workflows) > 1 and not args.json:
            _err(f"{statuses.count('failed')} of {len(workflows)} runs failed")
        return EXIT_FAILED
    return EXIT_OK


def cmd_validate(args) -> int:
    from app.core.workflow import Workflow, WorkflowError, errors, validate

    registry = make_registry(args.plugin)
    document = load_document(args.workflow)
    apply_sets(document, registry, args.set or [])
    try:
        problems = validate(Workflow.from_dict(document), registry, args.target or None)
    except WorkflowError as exc:
        problems = exc.problems
    bad = errors(problems)
    if args.json:
        _emit_json({"valid": not bad, "problems": [p.to_dict() for p in problems]})
    else:
        for problem in problems:
            (_err if problem.severity == "error" else _print)(_problem_text(args.workflow, problem))
        if not bad:
            _print(f"ok: {args.workflow} is valid ({len(document.get('nodes') or {})} nodes"
                   + (f", {len(problems)} warning(s))" if problems else ")"))
        else:
            _err(f"{len(bad)} error(s)")
    return EXIT_INVALID if bad else EXIT_OK


def cmd_nodes(args) -> int:
    registry = make_registry(args.plugin)
    catalogue = registry.catalogue()
    if args.query:
        needle = args.query.lower()
        catalogue = [n for n in catalogue if needle in n["type"].lower() or needle in n["category"].lower()
                     or needle in n["description"].lower()]
    if args.json:
        _print(json.dumps(catalogue, indent=1, default=str))
        return EXIT_OK
    category = None
    for entry in catalogue:
        if entry["category"] != category:
            category = entry["category"]
            _print(f"\n{category}")
        inputs = ", ".join(f"{i['name']}:{i['type']}" + ("" if i["required"] else "?") for i in entry["inputs"])
        outputs = ", ".join(f"{o['name']}:{o['type']}" for o in entry["outputs"])
        summary = entry["description"].splitlines()[0] if entry["description"] else ""
        _print(f"  {entry['type']}({inputs}) -> ({outputs})" + (f"  {summary}" if summary else ""))
    for error in registry.load_errors:
        _err(f"warning: node source {error.source} was skipped: {error.message}")
    return EXIT_OK


def cmd_models(args) -> int:
    _configure_paths(args)
    from app.core import paths

    kinds = {kind: paths.list_files(kind) for kind in paths.MODEL_KINDS}
    if args.json:
        _print(json.dumps({"models_dir": str(paths.models_dir()), "kinds": kinds}, indent=1))
        return EXIT_OK
    _print(f"models folder: {paths.models_dir()}" + ("" if paths.models_dir().is_dir() else " (does not exist)"))
    for kind, names in kinds.items():
        _print(f"{kind} ({len(names)})")
        for name in names:
            _print(f"  {name}")
    return EXIT_OK


def cmd_version(args) -> int:
    info: dict[str, Any] = {"ditgraph": app_package.__version__, "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    if args.json:
        _print(json.dumps(info))
    else:
        _print(f"ditgraph {info['ditgraph']} (python {info['python']}, torch {info['torch']}"
               + (f", {info['gpu']}" if info.get("gpu") else ", no CUDA") + ")")
    return EXIT_OK


def cmd_explain(args) -> int:
    registry = None if args.server else make_registry(args.plugin)
    document = load_document(args.workflow)
    if registry is not None:
        apply_sets(document, registry, args.set or [])
    elif args.set:
        raise UsageError("--set cannot be combined with --server here; edit the workflow instead")
    if args.server:
        report = _post_json(args.server.rstrip("/") + "/api/explain", {"workflow": document, "targets": args.target or None},
                            args.token or os.environ.get("DITGRAPH_TOKEN"))
    else:
        from app.core.executor import Engine

        workflow, _ = _validated(document, registry, args.workflow, args.target or None)
        engine = Engine(registry, device="cpu")
        targets, order = engine.plan(workflow, args.target or None)
        report = {"targets": targets, "order": order, "reasons": engine.explain(workflow)}
    if args.json:
        _print(json.dumps(report, indent=1))
        return EXIT_OK
    nodes = document.get("nodes") or {}
    _print(f"outputs: {', '.join(report['targets'])}")
    for position, node_id in enumerate(report["order"], 1):
        node_type = (nodes.get(node_id) or {}).get("type", "?")
        _print(f"{position:3d}. node {node_id} ({node_type}): {report['reasons'].get(node_id, '')}")
    return EXIT_OK


def _post_json(url: str, body: dict, token: str | None) -> dict:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {}
        problems = [p.get("message", str(p)) for p in detail.get("problems", [])] or [detail.get("error", str(exc))]
        raise UsageError(*(f"server: {p}" for p in problems)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"cannot reach {url}: {exc}") from None


def cmd_serve(args) -> int:
    _configure_paths(args)
    from app.runs.queue import QueueLocked
    from app.fronts.server import ConfigError, Settings, serve

    settings = Settings(
        host=args.host, port=args.port, token=args.token,
        db_path=Path(args.db) if args.db else None,
        workflows_dir=Path(args.workflows_dir) if args.workflows_dir else None,
        allowed_origins=args.allow_origin or [],
        ray=args.ray,
    )
    try:
        settings.check()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    _check_port(args.host, args.port)
    device = args.device if args.ray else _check_device(args.device)  # with --ray the device is the workers'
    registry = make_registry(args.plugin)

    from app.core import paths
    from app.core.executor import Engine

    if args.ray:  # the workers hold the engines that run; this one validates and plans on the CPU
        settings.ray_device = device
        device = "cpu"
    engine = Engine(registry, device=device, output_dir=paths.output_dir())
    try:
        serve(args.host, args.port, args.token, engine=engine, settings=settings,
              log_level="info" if args.debug else "warning", announce=lambda line: _err(line))
    except (QueueLocked, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a port number")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


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
    run.add_argument("--ray", metavar="ADDRESS", help="run on Ray workers (one per GPU) of the cluster at ADDRESS "
                     "(HOST:PORT, or 'auto': the one running here, else a new local one); a --batch fans out")
    run.set_defaults(handler=cmd_run)

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

    explain = add("explain", "show the execution order and why each node would run")
    explain.add_argument("workflow", metavar="WORKFLOW")
    explain.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE")
    explain.add_argument("--target", action="append", metavar="NODE")
    explain.add_argument("--server", metavar="URL", help="ask a running server (its memo cache) instead")
    explain.add_argument("--token", help="token for --server")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(handler=cmd_explain)

    from app.fronts.comfy.commands import add_commands  # import-comfy, export-comfy

    add_commands(add, UsageError, make_registry)
    return parser


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
        for message in exc.messages:
            _err(f"error: {message}" if not message.startswith(("error:", "ditgraph")) else message)
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err("cancelled")
        return EXIT_CANCELLED
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if debug:
            raise
        _err(f"error: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
