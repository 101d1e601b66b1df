"""``ditgraph run``: one workflow or a --batch, in this process or on Ray workers (--ray)."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from app.core import paths
from app.fronts.cli_inputs import (
    apply_overrides,
    apply_sets,
    check_device,
    configure_paths,
    engine_options,
    load_document,
    make_registry,
    read_batch,
    validated,
)
from app.fronts.cli_support import (
    EXIT_CANCELLED,
    ProgressLine,
    UsageError,
    emit_json,
    err,
    exit_code,
    out,
    problem_text,
)
from app.runs.events import annotate_files, jsonable_event, make_jsonable, saved_outputs


def saved_files(ui: dict, out_root: Path) -> list[str]:
    """The files a run's UI data names that exist under the output (or temp) folder."""
    return [str(file.target) for file in saved_outputs(ui, out_root)]


def saved_videos(ui: dict, out_root: Path) -> dict[str, dict]:
    """The videos among them: path -> {"frames", "fps", "width", "height", "format"} (what is known)."""
    return {str(file.target): {k: file.entry[k] for k in ("frames", "fps", "width", "height", "format") if k in file.entry}
            for file in saved_outputs(ui, out_root) if file.media == "video"}


def video_note(info: dict) -> str:
    """" (video: 33 frames at 16 fps, 832x480)" for a saved video's line."""
    parts = []
    if "frames" in info:
        parts.append(f"{info['frames']} frames" + (f" at {info['fps']:g} fps" if isinstance(info.get("fps"), (int, float)) else ""))
    if "width" in info and "height" in info:
        parts.append(f"{info['width']}x{info['height']}")
    return f" (video: {', '.join(parts)})" if parts else " (video)"


def report_result(summary: dict, label: str, json_mode: bool, debug: bool = False) -> None:
    """A finished run as one JSON line (--json) or as lines for a person: local and Ray runs alike."""
    if json_mode:
        error = summary.get("error")
        emit_json({"type": "result", **summary, "error": error and {k: v for k, v in error.items() if k != "detail"}})
        return
    status = summary["status"]
    if status == "success":
        where = f" on {summary['worker']}" if summary.get("worker") else ""
        retried = f" (retried {summary['retries']}x)" if summary.get("retries") else ""
        out(f"{label}ok: {len(summary['executed'])} node(s) ran, {len(summary['cached'])} cached, "
            f"{summary['duration']:.2f} s{where}{retried}")
        videos = summary.get("videos") or {}
        for file in summary["files"]:
            out(f"{label}saved {file}" + (video_note(videos[file]) if file in videos else ""))
        for node_id, ui in (summary.get("ui") or {}).items():
            for text in (ui or {}).get("text", []) if isinstance(ui, dict) else []:
                out(f"{label}node {node_id}: {text}")
    elif status == "failed":
        error = summary.get("error") or {}
        err(f"{label}error: {error.get('message')}")
        if debug and error.get("detail"):
            err(error["detail"])
    else:
        err(f"{label}cancelled")


def _abort() -> None:
    err("interrupted again: exiting without waiting")
    os._exit(EXIT_CANCELLED)


def _wait_cancelling(done: threading.Event, cancel: threading.Event) -> None:
    """Wait for ``done``; the first Ctrl-C sets ``cancel``, a second one exits at once."""
    interrupted = False
    # wait on an Event, not Thread.join: a join interrupted by Ctrl-C can report the thread dead too early
    while not done.is_set():
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            if interrupted:
                _abort()
            interrupted = True
            cancel.set()
            err("\ncancelling at the next step boundary (Ctrl-C again to quit now)")


def _run_one(engine, workflow, targets, out_dir: Path, out_root: Path, json_mode: bool, label: str,
             batch: int | None, debug: bool = False) -> str:
    """Run one workflow with Ctrl-C cancelling it; returns the final status."""
    from app.core.workflow import WorkflowError

    cancel, done = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}
    progress = ProgressLine(sys.stderr, label) if (not json_mode and sys.stderr.isatty()) else None

    def on_event(event: dict) -> None:
        if event.get("type") == "node_finished" and event.get("ui"):
            annotate_files(event["ui"], out_dir, out_root)
        if json_mode:
            emit_json({**jsonable_event(event), **({} if batch is None else {"batch": batch})})
        elif progress is not None:
            progress(event)

    def work() -> None:
        try:
            holder["result"] = engine.run(workflow, targets, cancel=cancel, on_event=on_event, output_dir=out_dir)
        except BaseException as exc:  # handed to the main thread
            holder["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="ditgraph-cli-run", daemon=True).start()
    _wait_cancelling(done, cancel)
    if progress is not None:
        progress.clear()
    if "error" in holder:
        if isinstance(holder["error"], WorkflowError):
            raise UsageError(*(str(p) for p in holder["error"].problems))
        raise holder["error"]
    result = holder["result"]
    summary = {"run_id": result.run_id, "status": result.status, "executed": result.executed,
               "cached": result.cached, "duration": round(result.duration, 4), "ui": make_jsonable(result.ui),
               "error": result.error, "files": saved_files(result.ui, out_root),
               "videos": saved_videos(result.ui, out_root), "output_dir": str(out_dir)}
    report_result({**summary, **({} if batch is None else {"batch": batch})}, label, json_mode, debug)
    return result.status


def _workflows(args, registry) -> list[tuple[int | None, Any]]:
    """(batch line or None, validated workflow) for each run the command asks for."""
    document = load_document(args.workflow)
    apply_sets(document, registry, args.set or [])
    if getattr(args, "fast", False):
        from app.models.fast import insert_fast_nodes

        document = insert_fast_nodes(document, check_device(args.device) or ("cuda" if _cuda() else "cpu"))
    targets = args.target or None
    variants: list[tuple[int | None, dict]] = [(None, document)]
    if args.batch:
        variants, problems = [], []
        for number, overrides in read_batch(args.batch):
            where = f"{args.batch}:{number}"
            try:
                variant = apply_overrides(json.loads(json.dumps(document)), registry, overrides, where)
                validated(variant, registry, where, targets)
                variants.append((number, variant))
            except UsageError as exc:
                problems.extend(exc.messages)
        if problems:
            raise UsageError(*problems)
    workflows = []
    for number, variant in variants:
        where = args.workflow if number is None else f"{args.batch}:{number}"
        workflow, warnings = validated(variant, registry, where, targets)
        workflows.append((number, workflow))
        if number == variants[0][0]:
            for warning in warnings:
                err(problem_text(args.workflow, warning))
    return workflows


def cmd_run(args) -> int:
    configure_paths(args)
    registry = make_registry(args.plugin)
    workflows = _workflows(args, registry)
    targets = args.target or None
    out_root = Path(args.output_dir).expanduser() if args.output_dir else paths.output_dir()
    if args.ray:
        statuses = _run_on_ray(args, registry, workflows, targets, out_root)
        return exit_code(statuses, args.json)
    from app.core.executor import Engine

    engine = Engine(registry, device=check_device(args.device), output_dir=out_root, **engine_options(args))
    statuses = []
    for number, workflow in workflows:
        out_dir = out_root if number is None else out_root / f"batch-{number:04d}"
        label = "" if number is None or args.json else f"[line {number}] "
        statuses.append(_run_one(engine, workflow, targets, out_dir, out_root, args.json, label, number, args.debug))
        if statuses[-1] == "cancelled":
            break
    return exit_code(statuses, args.json)


def _run_on_ray(args, registry, workflows, targets, out_root: Path) -> list[str]:
    """The runs on Ray workers (Ray is imported only here), shown like local runs."""
    from app.runs.ray_batch import BatchHooks, RayUnavailable, run_batch

    json_mode = args.json
    progress = ProgressLine(sys.stderr, "") if (not json_mode and sys.stderr.isatty()) else None

    def label(number: int | None) -> str:
        return "" if number is None else f"[line {number}] "

    def on_event(number: int | None, event: dict) -> None:
        if json_mode:
            emit_json({**event, **({} if number is None else {"batch": number})})
        elif event.get("type") == "run_retrying":
            err(f"{label(number)}{event.get('reason')}; running it again")
        elif progress is not None:  # the workers' engine events, relayed by the queue: drawn as a local run's
            progress(event, key=number, label=label(number))

    def on_result(number: int | None, record) -> None:
        duration = (record.finished - record.started) if record.finished and record.started else 0.0
        summary = {"run_id": record.id, "status": record.status, "executed": record.executed,
                   "cached": record.cached, "duration": round(duration, 4), "ui": record.ui, "error": record.error,
                   "files": saved_files(record.ui, out_root), "videos": saved_videos(record.ui, out_root),
                   "output_dir": str(out_root if number is None else out_root / f"batch-{number:04d}"),
                   "worker": record.worker, "retries": record.retries, **({} if number is None else {"batch": number})}
        report_result(summary, "" if json_mode else label(number), json_mode, args.debug)

    def on_progress(done: int, total: int, running: int) -> None:
        if progress is not None:
            progress.status(f"ray: {done}/{total} done, {running} running ·")

    hooks = BatchHooks(on_event=on_event, on_result=on_result, on_note=err, on_progress=on_progress, on_abort=_abort)
    try:
        # in --json mode stdout carries only JSON lines: workers' own output stays in Ray's logs
        return run_batch(args.ray, registry, workflows, targets, out_root, hooks, device=args.device,
                         log_to_driver=not json_mode, engine_options=engine_options(args))
    except RayUnavailable as exc:
        raise UsageError(*exc.messages) from None
    finally:
        if progress is not None:
            progress.clear()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
