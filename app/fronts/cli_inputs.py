"""What the CLI reads: node plugins, workflow files by path or name, ``--set`` and ``--batch`` overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from app.core import paths
from app.core.jsonlimits import JSONRefused, parse
from app.core.plugins import PluginError
from app.core.plugins import make_registry as _make_registry
from app.fronts.cli_support import UsageError, natural, problem_text


def make_registry(plugins: list[str] | None = None):
    """The node library, installed plugins and --plugin / DITGRAPH_PLUGINS modules; UsageError if one fails."""
    try:
        return _make_registry(plugins)
    except PluginError as exc:
        raise UsageError(str(exc)) from None


def configure_paths(args) -> None:
    """Point the models/outputs/inputs folders at the command's --models/--output-dir/--input-dir."""
    models = getattr(args, "models", None)
    if models and not Path(models).expanduser().is_dir():
        raise UsageError(f"--models {models!r} is not a folder")
    paths.configure(models=models, outputs=getattr(args, "output_dir", None), inputs=getattr(args, "input_dir", None))


def check_device(device: str | None) -> str | None:
    """``device`` if torch can use it here; UsageError otherwise."""
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
        return parse(text)
    except ValueError:
        if decl.type == ANY:
            return raw  # an any-typed input takes plain text as a string
        raise UsageError(f"{where}: {decl.name!r} takes a {decl.type} link; give it as JSON, "
                         f'e.g. {{"from": ["NODE", "OUTPUT"]}}') from None


def _declaration(document: dict, registry, node_id: str, input_name: str, where: str):
    nodes = document.get("nodes") or {}
    if node_id not in nodes:
        known = ", ".join(sorted(nodes, key=natural)[:30]) or "none"
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
            value = parse(line)
        except JSONRefused as exc:
            problems.append(f"{path}:{number}: {exc}")
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


# -- loading workflows ------------------------------------------------------------------------------------


def workflow_search_dirs() -> list[Path]:
    """Where a bare workflow name is looked up: the editor's saved workflows, then the shipped graphs/."""
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
        raise UsageError(*(problem_text(path, p) for p in exc.problems)) from None


def validated(document: dict, registry, where: str, targets: list[str] | None = None):
    from app.core.workflow import Workflow, WorkflowError, errors, validate

    try:
        workflow = Workflow.from_dict(document)
    except WorkflowError as exc:
        raise UsageError(*(problem_text(where, p) for p in exc.problems)) from None
    problems = validate(workflow, registry, targets)
    bad = errors(problems)
    if bad:
        raise UsageError(*(problem_text(where, p) for p in bad))
    return workflow, [p for p in problems if p.severity != "error"]


def add_memory_flags(parser) -> None:
    """The VRAM budget flags (``run``, ``serve``, and ``explain``, which shows the plan they make)."""
    parser.add_argument("--vram", metavar="SIZE",
                        help="VRAM budget for models, cached results and VAE decode, e.g. 12GB (default: the GPU's memory)")
    parser.add_argument("--reserve-vram", metavar="SIZE", help="VRAM left free for other programs, e.g. 1GB")


def add_engine_flags(parser) -> None:
    """The memory and cache flags ``run`` and ``serve`` share (one engine each)."""
    add_memory_flags(parser)
    parser.add_argument("--cache", metavar="POLICY", default=None,
                        help="memo cache policy: lru (default), lru:8G, workflows:N, ram:0.2 (evict under RAM "
                             "pressure) or none")


def engine_options(args) -> dict:
    """``Engine(**engine_options(args))``: the budget and cache policy the flags ask for, as plain
    data (the same dict builds a local engine and travels to Ray workers); UsageError if malformed."""
    from app.core.cache_policies import parse_cache_policy
    from app.models.budget import memory_settings

    try:
        options = {"memory": memory_settings(args.vram, args.reserve_vram)}
        if getattr(args, "cache", None):
            parse_cache_policy(args.cache)  # refused here, not in a worker
            options["cache_policy"] = args.cache
        return options
    except ValueError as exc:
        raise UsageError(str(exc)) from None
