"""The ``ditgraph`` commands other than ``run`` and the ComfyUI ones: validate, nodes, models, version, explain, serve."""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

import app as app_package
from app.fronts.cli_inputs import (
    apply_sets,
    check_device,
    configure_paths,
    engine_options,
    load_document,
    make_registry,
    validated,
)
from app.fronts.cli_support import EXIT_INVALID, EXIT_OK, UsageError, capped, emit_json, err, out, problem_text


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
        emit_json({"valid": not bad, "problems": [p.to_dict() for p in problems]})
    else:
        for problem in capped(problems):
            if isinstance(problem, str):
                err(problem)
            else:
                (err if problem.severity == "error" else out)(problem_text(args.workflow, problem))
        if not bad:
            out(f"ok: {args.workflow} is valid ({len(document.get('nodes') or {})} nodes"
                   + (f", {len(problems)} warning(s))" if problems else ")"))
        else:
            err(f"{len(bad)} error(s)")
    return EXIT_INVALID if bad else EXIT_OK


def cmd_nodes(args) -> int:
    registry = make_registry(args.plugin)
    catalogue = registry.catalogue()
    if args.query:
        needle = args.query.lower()
        catalogue = [n for n in catalogue if needle in n["type"].lower() or needle in n["category"].lower()
                     or needle in n["description"].lower()]
    if args.json:
        out(json.dumps(catalogue, indent=1, default=str))
        return EXIT_OK
    category = None
    for entry in catalogue:
        if entry["category"] != category:
            category = entry["category"]
            out(f"\n{category}")
        inputs = ", ".join(f"{i['name']}:{i['type']}" + ("" if i["required"] else "?") for i in entry["inputs"])
        outputs = ", ".join(f"{o['name']}:{o['type']}" for o in entry["outputs"])
        summary = entry["description"].splitlines()[0] if entry["description"] else ""
        out(f"  {entry['type']}({inputs}) -> ({outputs})" + (f"  {summary}" if summary else ""))
    for error in registry.load_errors:
        err(f"warning: node source {error.source} was skipped: {error.message}")
    return EXIT_OK


def cmd_models(args) -> int:
    configure_paths(args)
    from app.core import paths

    kinds = {kind: paths.list_files(kind) for kind in paths.MODEL_KINDS}
    if args.json:
        out(json.dumps({"models_dir": str(paths.models_dir()), "kinds": kinds}, indent=1))
        return EXIT_OK
    out(f"models folder: {paths.models_dir()}" + ("" if paths.models_dir().is_dir() else " (does not exist)"))
    for kind, names in kinds.items():
        out(f"{kind} ({len(names)})")
        for name in names:
            out(f"  {name}")
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
        out(json.dumps(info))
    else:
        out(f"ditgraph {info['ditgraph']} (python {info['python']}, torch {info['torch']}"
               + (f", {info['gpu']}" if info.get("gpu") else ", no CUDA") + ")")
    return EXIT_OK


def cmd_explain(args) -> int:
    registry = None if args.server else make_registry(args.plugin)
    document = load_document(args.workflow)
    if registry is not None:
        apply_sets(document, registry, args.set or [])
    elif args.set or args.vram or args.reserve_vram or args.device or args.models:
        raise UsageError("--set, --vram, --reserve-vram, --device and --models cannot be combined with --server "
                         "(it plans under its own flags); edit the workflow or drop --server")
    if args.server:
        report = _post_json(args.server.rstrip("/") + "/api/explain", {"workflow": document, "targets": args.target or None},
                            args.token or os.environ.get("DITGRAPH_TOKEN"))
    else:
        import torch

        from app.core.executor import Engine

        configure_paths(args)
        workflow, _ = validated(document, registry, args.workflow, args.target or None)
        try:
            device = torch.device(args.device) if args.device else None  # cuda plans without CUDA here (no check)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device}: {exc}") from None
        engine = Engine(registry, device=device, memory=engine_options(args)["memory"])
        targets, order = engine.plan(workflow, args.target or None)
        report = {"targets": targets, "order": order, "reasons": engine.explain(workflow),
                  "estimates": engine.estimates(workflow, args.target or None)}
    if args.json:
        out(json.dumps(report, indent=1))
        return EXIT_OK
    nodes = document.get("nodes") or {}
    estimates = report.get("estimates") or {}
    out(f"outputs: {', '.join(report['targets'])}")
    for position, node_id in enumerate(report["order"], 1):
        node_type = (nodes.get(node_id) or {}).get("type", "?")
        out(f"{position:3d}. node {node_id} ({node_type}): {report['reasons'].get(node_id, '')}")
        for line in (estimates.get(node_id) or {}).get("lines", []):
            out(f"       {line}")
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
    configure_paths(args)
    from app.fronts.http.app import serve
    from app.fronts.http.settings import ConfigError, Settings
    from app.runs.store import QueueLocked

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
    device = args.device if args.ray else check_device(args.device)  # with --ray the device is the workers'
    registry = make_registry(args.plugin)

    from app.core import paths
    from app.core.executor import Engine

    options = engine_options(args)
    if args.ray:  # the workers hold the engines that run (with these options); this one validates and plans on the CPU
        settings.ray_device, settings.ray_engine = device, options
        device = "cpu"
    engine = Engine(registry, device=device, output_dir=paths.output_dir(), **options)
    try:
        serve(args.host, args.port, args.token, engine=engine, settings=settings,
              log_level="info" if args.debug else "warning", announce=lambda line: err(line))
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
