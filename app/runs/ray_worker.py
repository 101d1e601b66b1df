"""Scale out on Ray: the run queue dispatches to a pool of Ray actors, each holding its own Engine.

    ditgraph serve --ray auto                  # or --ray HOST:PORT of a running cluster
    ditgraph run graph.json --batch seeds.jsonl --ray auto

One actor per GPU (or, without GPUs, per ``DITGRAPH_RAY_CPUS_PER_WORKER`` CPUs), each with its
own :class:`~app.core.executor.Engine`: its own model residency and memo cache. This module is
imported only when ``--ray`` is given, so a normal run never imports Ray.

Placement is cache-affine. For each worker the driver keeps the node cache keys the worker
still holds (reported after every run) with what each one cost to compute. A queued run's
keys are computed on the driver without running anything (the same content hashes the engine
uses: node type, version, constants, upstream keys, model file fingerprints), and the run goes
to the idle worker whose cache would save the most seconds; with no saving anywhere, to the
idle worker that has been busy least. Runs stay ``queued`` in the store until a worker is
idle, so they can be cancelled and reordered like local runs. Batches fan out because every
idle worker takes the next queued run.

Faults: a worker that dies mid-run (killed process, lost node) fails its Ray call; the run goes
back to the queue at its old place with ``retries`` + 1 and a ``run_retrying`` event, the dead
actor is replaced, and another worker runs it. A run is completed in the store exactly once
(``finish`` only moves a ``running`` row), and past ``max_retries`` it fails with a message.

Events: the actor method is a Ray streaming generator. It yields each engine event (made
JSON-safe in the worker, previews as PNG data URLs, saved files annotated with their paths)
and finally the result; the driver re-publishes the events through ``RunQueue.publish``, the
same path the HTTP server and the CLI use for local runs.

This module is the worker side (and connecting); app.runs.ray_pool is the driver's pool,
app.runs.ray_dispatch the queue's dispatcher, app.runs.ray_batch ``ditgraph run --ray``.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import ray

from app.core import paths
from app.core.workflow import Workflow, WorkflowError
from app.runs.events import annotate_files, jsonable_event, make_jsonable, temp_root

log = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 200 * 1024 * 1024


class WorkerLost(RuntimeError):
    """The worker's process died (or became unreachable) during a run.

    ``started`` says whether the run had begun there (a death before its first event is not
    the workflow's doing, so it does not count against the run's retries)."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started


# -- connecting -----------------------------------------------------------------------------------


def connect(address: str | None = "auto", *, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_bytes: int | None = None, log_to_driver: bool = True) -> bool:
    """Connect this process to Ray; returns True when it started a local cluster (close it after).

    ``address``: ``HOST:PORT`` (or ``ray://...``) of a running cluster; ``auto``: a cluster
    running on this machine, else a new local one; ``local``: always a new local one. An
    already initialised Ray (tests, notebooks) is used as it is.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network at run time: Ray's telemetry stays off
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in [str(paths.REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)}}
    if address not in (None, "", "local"):
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=log_to_driver)
            return False
        except ConnectionError as exc:
            if address != "auto":
                hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                    "; if the cluster uses token authentication (clusters made by `ray start` do, since Ray 2.59), "
                    "set RAY_AUTH_MODE=token here (the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token)")
                raise ConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}{hint}") from None
            log.warning("no Ray cluster is running here; starting a local one")
    object_store = object_store_bytes or int(os.environ.get("DITGRAPH_RAY_OBJECT_STORE", DEFAULT_OBJECT_STORE_BYTES))
    # a cluster of this machine alone: 127.0.0.1 also works where no network route exists
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, object_store_memory=object_store,
             runtime_env=env, logging_level=logging.WARNING, log_to_driver=log_to_driver,
             _node_ip_address="127.0.0.1")
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at HOST:PORT (Ray retries for long)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address}: nothing answers there "
                              f"({exc.strerror or exc}); start one with `ray start --head --port {port}`") from None


# -- what the workers need to build the same registry and folders as the driver ---------------------


def plugin_specs(registry) -> list[str]:
    """The extra node modules a worker must load to match ``registry`` (the node package and
    installed entry-point plugins load by themselves)."""
    specs: list[str] = []
    for module_name in sorted({nd.module for nd in registry.nodes.values()}):
        if module_name == "nodes" or module_name.startswith("nodes."):
            continue
        module = sys.modules.get(module_name)
        file = getattr(module, "__file__", None)
        if module_name.startswith("ditgraph_plugin_") or module_name == "__main__":
            if file:
                specs.append(str(Path(file).resolve()))
        else:
            specs.append(module_name)
    return specs


def worker_config(registry, device: str | None = None, extra_sys_path: list[str] | None = None,
                  engine_options: dict | None = None) -> dict:
    """Everything a worker needs to behave like this process: node modules, folders, device, and
    the engine options (VRAM budget, cache policy: plain data from the CLI's ``engine_options``)."""
    return {
        "engine": dict(engine_options or {}),
        "plugins": plugin_specs(registry),
        "paths": {"models": str(paths.models_dir()), "inputs": str(paths.input_dir()),
                  "outputs": str(paths.output_dir())},
        "temp": str(temp_root()),
        "device": device,
        "sys_path": [str(paths.REPO_ROOT), *(extra_sys_path or [])],
    }


# -- the worker (a Ray actor) ---------------------------------------------------------------------


def node_keys(engine, workflow: Workflow, targets: list[str] | None = None) -> dict[str, str]:
    """Node id -> cache key of every node the run needs, computed without running anything."""
    return engine.node_keys(workflow, targets)


def ram_share(assigned: dict, node: dict) -> float:
    """The part of its node's memo RAM budget a worker takes: its GPUs of the node's, else its CPUs
    of the node's. Workers sharing a machine thus split the default budget (half its RAM) rather
    than each taking all of it."""
    for kind in ("GPU", "CPU"):
        if assigned.get(kind) and node.get(kind):
            return min(1.0, assigned[kind] / node[kind])
    return 1.0


def _node_share() -> float:
    """:func:`ram_share` of this actor on its node (1 outside an actor or without the cluster's view)."""
    try:
        context = ray.get_runtime_context()
        node = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == context.get_node_id())
        return ram_share(context.get_assigned_resources(), node)
    except Exception:
        return 1.0


class EngineWorker:
    """One Engine in one Ray actor process (one GPU, or some CPUs)."""

    def __init__(self, name: str, config: dict):
        for entry in reversed(config.get("sys_path") or []):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        os.environ["DITGRAPH_PLUGINS"] = ""  # the driver's plugins arrive as explicit specs
        if config.get("temp"):
            os.environ["DITGRAPH_TEMP"] = config["temp"]
        from app.core import paths as worker_paths
        from app.core.executor import Engine
        from app.core.plugins import make_registry

        worker_paths.configure(**config.get("paths", {}))
        self.name = name
        self.registry = make_registry(config.get("plugins") or [])
        self.engine = Engine(self.registry, device=config.get("device") or None,
                             output_dir=worker_paths.output_dir(), **config.get("engine", {}))
        if self.engine.cache.policy.max_bytes is None:  # the default RAM budget is the machine's: take a share
            self.engine.cache.max_bytes = int(self.engine.cache.max_bytes * _node_share())
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.costs: dict[str, float] = {}  # cache key -> seconds it took to compute
        self.runs = 0

    def info(self) -> dict:
        import torch

        device = self.engine.device
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "node_ip": ray.util.get_node_ip_address(), "device": str(device), "device_type": device.type,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "vram": self.engine.memory.get("vram"), "reserve_vram": self.engine.memory.get("reserve"),
                "cache_policy": self.engine.cache.policy.describe(), "memo_max_bytes": self.engine.cache.max_bytes,
                "nodes": len(self.registry.nodes),
                "load_errors": [f"{e.source}: {e.message}" for e in self.registry.load_errors]}

    def cancel(self, run_id: str) -> None:
        with self._lock:
            self._cancels.setdefault(run_id, threading.Event()).set()
            while len(self._cancels) > 1000:  # cancels that arrived after their run ended
                self._cancels.pop(next(iter(self._cancels)))

    def held_keys(self) -> dict[str, float]:
        """The cache keys this worker still holds, with their compute cost in seconds."""
        self.costs = {k: v for k, v in self.costs.items() if k in self.engine.cache}
        return dict(self.costs)

    def run(self, run_id: str, document: dict, targets: list[str] | None, out_dir: str, out_root: str,
            return_outputs: bool = False):
        """A streaming generator: ("event", event)... then ("result", summary)."""
        with self._lock:
            cancel = self._cancels.setdefault(run_id, threading.Event())
        events: queue_module.Queue = queue_module.Queue()
        holder: dict[str, Any] = {}
        run_dir, root = Path(out_dir), Path(out_root)

        def on_event(event: dict) -> None:
            if event.get("type") == "node_finished" and event.get("ui"):
                annotate_files(event["ui"], run_dir, root)
            events.put(("event", jsonable_event(event)))

        def work() -> None:
            try:
                workflow = Workflow.from_dict(document)
                keys = node_keys(self.engine, workflow, targets)
                holder["result"] = self.engine.run(workflow, targets, run_id=run_id, cancel=cancel,
                                                   on_event=on_event, output_dir=run_dir)
                holder["keys"] = keys
            except BaseException as exc:
                holder["error"] = exc
                holder["traceback"] = traceback.format_exc()
            finally:
                events.put(None)

        thread = threading.Thread(target=work, name=f"ditgraph-ray-{run_id}", daemon=True)
        thread.start()
        while (item := events.get()) is not None:
            yield item
        thread.join()
        with self._lock:
            self._cancels.pop(run_id, None)
        self.runs += 1
        yield ("result", self._summary(holder, return_outputs))

    def _summary(self, holder: dict, return_outputs: bool) -> dict:
        error = holder.get("error")
        if isinstance(error, WorkflowError):
            message = "the workflow is not valid on this worker: " + "; ".join(str(p) for p in error.problems)
            return {"status": "failed", "error": {"message": message, "problems": [p.to_dict() for p in error.problems]},
                    "keys": self.held_keys()}
        if error is not None:
            return {"status": "failed", "error": {"message": f"internal error on worker {self.name}: "
                                                             f"{type(error).__name__}: {error}",
                                                  "detail": holder.get("traceback", "")},
                    "keys": self.held_keys()}
        result = holder["result"]
        keys: dict[str, str] = holder.get("keys") or {}
        for node_id, seconds in result.timings.items():
            if node_id in keys:
                self.costs[keys[node_id]] = seconds
        for node_id in result.cached:
            if node_id in keys:
                self.costs.setdefault(keys[node_id], 0.0)
        summary = {"status": result.status, "ui": make_jsonable(result.ui), "error": result.error,
                   "timings": {k: round(v, 6) for k, v in result.timings.items()}, "reasons": result.reasons,
                   "executed": result.executed, "cached": result.cached, "duration": result.duration,
                   "keys": self.held_keys()}
        if return_outputs:
            summary["outputs"] = _to_cpu(result.outputs)
        return summary


def _to_cpu(value: Any) -> Any:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
