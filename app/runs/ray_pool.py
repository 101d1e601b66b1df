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
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_module
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from app.core import paths
from app.core.workflow import Workflow, WorkflowError
from app.runs.queue import RunQueue, RunRecord, RunStore, annotate_files, jsonable_event, make_jsonable

log = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 200 * 1024 * 1024
READY_TIMEOUT = float(os.environ.get("DITGRAPH_RAY_READY_TIMEOUT", "600"))
START_ATTEMPTS = 3  # per worker slot, before it is reported as failed
HIT_EPSILON = 1e-3  # a cached node counts for something even when it was instant to compute


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


def worker_config(registry, device: str | None = None, extra_sys_path: list[str] | None = None) -> dict:
    """Everything a worker needs to behave like this process: node modules, folders, device."""
    from app.runs.queue import temp_root

    return {
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
    _, order = engine.plan(workflow, targets)
    keys: dict[str, str] = {}
    for node_id in order:
        inst = workflow.nodes[node_id]
        keys[node_id], _, _, _ = engine._node_key(inst, engine.registry.get(inst.type), keys)
    return keys


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
        from app.fronts.cli import make_registry
        from app.core.executor import Engine

        worker_paths.configure(**config.get("paths", {}))
        self.name = name
        self.registry = make_registry(config.get("plugins") or [])
        self.engine = Engine(self.registry, device=config.get("device") or None,
                             output_dir=worker_paths.output_dir())
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


# -- the pool (driver side) ------------------------------------------------------------------------


@dataclass(eq=False)
class WorkerSlot:
    """The driver's view of one worker: its actor, what its cache holds, what it is doing."""

    index: int
    handle: Any = None
    info: dict = field(default_factory=dict)
    ready: bool = False
    error: str | None = None
    keys: dict[str, float] = field(default_factory=dict)
    running: str | None = None
    runs: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    generation: int = 0
    start_failures: int = 0

    @property
    def name(self) -> str:
        return f"ray:w{self.index}"

    def describe(self) -> dict:
        return {"name": self.name, "ready": self.ready, "error": self.error, "running": self.running,
                "runs": self.runs, "busy_seconds": round(self.busy_seconds, 3), "restarts": self.restarts,
                "cached_keys": len(self.keys), **{k: self.info.get(k) for k in ("pid", "host", "device", "gpu")}}


class RayPool:
    """Actors holding engines, and the placement of runs on them."""

    def __init__(self, registry, *, workers: int | None = None, device: str | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                 owns_ray: bool = False, address: str | None = None, extra_sys_path: list[str] | None = None):
        self.registry = registry
        self.address = address
        self.owns_ray = owns_ray
        self.config = worker_config(registry, device, extra_sys_path)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device in (None, "") or str(device).startswith("cuda") else 0
        if gpus_per_worker is None:
            gpus_per_worker = 1 if gpus else 0
        if cpus_per_worker is None:
            cpus_per_worker = float(os.environ.get("DITGRAPH_RAY_CPUS_PER_WORKER") or (1 if gpus else 4))
        if workers is None:
            env = os.environ.get("DITGRAPH_RAY_WORKERS")
            if env:
                workers = int(env)
            elif gpus:
                workers = int(gpus // gpus_per_worker)
            else:
                workers = max(1, int(resources.get("CPU", 1) // cpus_per_worker))
        if not gpus_per_worker and workers * cpus_per_worker > resources.get("CPU", 1):
            cpus_per_worker = resources.get("CPU", 1) / workers  # share the CPUs there are rather than wait forever
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self._cond = threading.Condition()
        self._planners: dict[str, Any] = {}
        self._closed = False
        self._listeners: list[Any] = []  # called (no args) when a worker becomes ready or idle
        self._remote_class = None

    @classmethod
    def create(cls, address: str | None, registry, log_to_driver: bool = True, **kwargs) -> RayPool:
        """Connect to Ray (see :func:`connect`) and make a pool; its actors start in the background."""
        owns = connect(address, log_to_driver=log_to_driver)
        try:
            pool = cls(registry, owns_ray=owns, address=address, **kwargs)
        except BaseException:
            if owns:
                ray.shutdown()
            raise
        pool.start()
        return pool

    # -- actors ---------------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: WorkerSlot) -> None:
        options = {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker, "max_concurrency": 4,
                   "max_restarts": 0, "max_task_retries": 0}
        if self._remote_class is None:
            self._remote_class = ray.remote(EngineWorker)
        remote_class = self._remote_class
        with self._cond:
            slot.generation += 1
            slot.ready, slot.error, slot.keys, slot.info = False, None, {}, {}
            slot.handle = remote_class.options(**options).remote(slot.name, self.config)
            generation, handle = slot.generation, slot.handle
        threading.Thread(target=self._await_ready, args=(slot, handle, generation), daemon=True,
                         name=f"ditgraph-ray-ready-{slot.index}").start()

    def _await_ready(self, slot: WorkerSlot, handle, generation: int) -> None:
        try:
            info = ray.get(handle.info.remote(), timeout=READY_TIMEOUT)
        except Exception as exc:
            with self._cond:
                current = slot.generation == generation and not self._closed
                retry = current and slot.start_failures < START_ATTEMPTS - 1
                if current:
                    slot.start_failures += 1
                    if not retry:
                        slot.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self._cond.notify_all()
            if retry:  # a transient failure (a node going away, a slow start): try again a few times
                log.warning("ray worker %s did not start (%s); trying again", slot.name, str(exc).splitlines()[0])
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
                time.sleep(2.0 * slot.start_failures)
                if not self._closed:
                    self._launch(slot)
            elif current:
                log.error("ray worker %s did not start: %s", slot.name, slot.error)
            return
        with self._cond:
            if slot.generation == generation and not self._closed:
                slot.info, slot.ready, slot.start_failures = info, True, 0
                for error in info.get("load_errors") or []:
                    log.warning("worker %s: node source skipped: %s", slot.name, error)
            self._cond.notify_all()
        self._changed()

    def replace(self, slot: WorkerSlot, reason: str) -> None:
        """Kill what is left of a worker's actor and start a fresh one in its place."""
        log.warning("ray worker %s lost (%s); starting a replacement", slot.name, reason)
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        with self._cond:
            slot.restarts += 1
            slot.running, slot.ready = None, False
        if not self._closed:
            self._launch(slot)

    def wait_ready(self, count: int | None = None, timeout: float = READY_TIMEOUT) -> int:
        """Block until ``count`` workers (default all) are ready; returns how many are."""
        count = len(self.slots) if count is None else count
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ready = sum(s.ready for s in self.slots)
                failed = sum(s.error is not None for s in self.slots)
                if ready >= count or ready + failed >= len(self.slots) or time.monotonic() >= deadline:
                    return ready
                self._cond.wait(min(1.0, max(0.01, deadline - time.monotonic())))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            handles = [s.handle for s in self.slots if s.handle is not None]
            for slot in self.slots:
                slot.ready = False
            self._cond.notify_all()
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        if self.owns_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
            self.owns_ray = False

    def on_change(self, callback) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            with contextlib.suppress(Exception):
                callback()

    # -- placement ------------------------------------------------------------------------------
    def idle(self) -> list[WorkerSlot]:
        with self._cond:
            return [s for s in self.slots if s.ready and s.running is None]

    def _planner(self, device_type: str):
        planner = self._planners.get(device_type)
        if planner is None:
            from app.core.executor import Engine
            from app.core.memo import MemoCache

            planner = Engine(self.registry, cache=MemoCache(max_bytes=0, max_device_bytes=0), device=device_type)
            self._planners[device_type] = planner
        return planner

    def run_keys(self, document: dict, targets: list[str] | None, device_type: str) -> set[str]:
        """The cache keys a run needs on a worker of ``device_type`` (empty when they can't be known)."""
        try:
            return set(node_keys(self._planner(device_type), Workflow.from_dict(document), targets).values())
        except Exception as exc:  # a missing file, an invalid graph: no affinity, the worker reports it
            log.debug("no cache keys for placement: %s", exc)
            return set()

    def score(self, slot: WorkerSlot, document: dict, targets: list[str] | None) -> float:
        """Seconds of work the run would skip on this worker (its cache hits)."""
        keys = self.run_keys(document, targets, slot.info.get("device_type", "cpu"))
        return sum(slot.keys[k] + HIT_EPSILON for k in keys if k in slot.keys)

    def choose(self, document: dict, targets: list[str] | None, candidates: list[WorkerSlot]) -> WorkerSlot:
        """The best idle worker for a run: the most cached work, then the least busy so far."""
        keys_by_type: dict[str, set[str]] = {}

        def rank(slot: WorkerSlot) -> tuple:
            device_type = slot.info.get("device_type", "cpu")
            if device_type not in keys_by_type:
                keys_by_type[device_type] = self.run_keys(document, targets, device_type)
            saved = sum(slot.keys[k] + HIT_EPSILON for k in keys_by_type[device_type] if k in slot.keys)
            return (-saved, slot.busy_seconds, slot.runs, slot.index)

        return min(candidates, key=rank)

    # -- running --------------------------------------------------------------------------------
    def execute(self, slot: WorkerSlot, run_id: str, document: dict, targets: list[str] | None, out_dir: Path,
                out_root: Path, on_event=None, return_outputs: bool = False) -> dict:
        """Run on one worker (marked busy by the caller); events go to ``on_event``.

        Raises WorkerLost when the actor dies or cannot be reached.
        """
        started = time.monotonic()
        handle = slot.handle
        summary: dict | None = None
        started_there = False
        try:
            stream = handle.run.options(num_returns="streaming").remote(
                run_id, document, targets, str(out_dir), str(out_root), return_outputs)
            for ref in stream:
                kind, payload = ray.get(ref)
                if kind == "event":
                    if payload.get("type") == "run_started":
                        payload["worker"] = slot.name
                        started_there = True
                    if on_event is not None:
                        try:
                            on_event(payload)
                        except Exception:
                            log.exception("event listener failed")
                else:
                    summary = payload
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OwnerDiedError) as exc:
            raise WorkerLost(f"worker {slot.name} (pid {slot.info.get('pid')}) died: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", started_there) from exc
        finally:
            with self._cond:
                slot.busy_seconds += time.monotonic() - started
        if summary is None:
            raise WorkerLost(f"worker {slot.name} ended the run without a result")
        with self._cond:
            slot.keys = summary.pop("keys", {}) or {}
            slot.runs += 1
        return summary

    def cancel(self, slot: WorkerSlot, run_id: str) -> None:
        with contextlib.suppress(Exception):
            slot.handle.cancel.remote(run_id)

    def describe(self) -> dict:
        with self._cond:
            return {"kind": "ray", "address": self.address, "workers": [s.describe() for s in self.slots],
                    "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker}


# -- the queue's dispatcher --------------------------------------------------------------------------


class RayDispatcher:
    """Dispatches queued runs to a :class:`RayPool` (the Dispatcher protocol of app.runs.queue)."""

    def __init__(self, pool: RayPool, output_root: str | Path | None = None, poll_seconds: float = 1.0,
                 close_pool: bool = True):
        self.pool = pool
        self.output_root = Path(output_root) if output_root else None
        self.poll_seconds = poll_seconds
        self.close_pool = close_pool
        self._queue: RunQueue | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: dict[str, WorkerSlot] = {}  # run id -> the worker running it
        self._threads: dict[str, threading.Thread] = {}
        self._user_cancelled: set[str] = set()
        self._lock = threading.Lock()
        pool.on_change(self.notify)

    @classmethod
    def from_engine(cls, engine, address: str, output_root: str | Path | None = None, device: str | None = None,
                    **pool_options) -> RayDispatcher:
        """A dispatcher over workers that mirror ``engine``'s registry (the server's engine)."""
        pool = RayPool.create(address, engine.registry, device=device, **pool_options)
        return cls(pool, output_root or getattr(engine, "output_dir", None))

    # -- Dispatcher protocol --------------------------------------------------------------------------
    def start(self, queue: RunQueue) -> None:
        self._queue = queue
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="ditgraph-ray-dispatch", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str) -> bool:
        with self._lock:
            slot = self._runs.get(run_id)
            if slot is None:
                return False
            self._user_cancelled.add(run_id)
        self.pool.cancel(slot, run_id)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching. Runs in progress are cancelled at their next step boundary and go back
        to the queue; then the workers are shut down (and Ray, when the pool started it)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            running = list(self._runs.items())
        for run_id, slot in running:
            self.pool.cancel(slot, run_id)
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.close_pool:
            self.pool.close()
            for thread in list(self._threads.values()):
                thread.join(2.0)

    def describe(self) -> dict:
        with self._lock:
            running = {run_id: slot.name for run_id, slot in self._runs.items()}
        return {**self.pool.describe(), "running": running}

    # -- the loop -------------------------------------------------------------------------------------
    def _next_queued(self) -> RunRecord | None:
        store = self._queue.store
        for record in store.active():
            if record.status == "queued":
                return store.get(record.id)
        return None

    def _loop(self) -> None:
        queue = self._queue
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                dispatched = self._dispatch_one(queue)
            except Exception:
                log.exception("ray dispatch failed")
                dispatched = False
            if not dispatched:
                self._wake.wait(self.poll_seconds)

    def _dispatch_one(self, queue: RunQueue) -> bool:
        idle = self.pool.idle()
        if not idle:
            return False
        upcoming = self._next_queued()
        if upcoming is None:
            return False
        slot = self.pool.choose(upcoming.workflow, upcoming.targets, idle)

        def register(record: RunRecord) -> None:
            with self._lock:
                self._runs[record.id] = slot
            slot.running = record.id

        record = queue.claim(slot.name, register)
        if record is None:
            return False
        thread = threading.Thread(target=self._execute, args=(record, slot), daemon=True,
                                  name=f"ditgraph-ray-run-{record.id}")
        self._threads[record.id] = thread
        thread.start()
        return True

    def _out_dirs(self, record: RunRecord) -> tuple[Path, Path]:
        root = Path(self.output_root or paths.output_dir())
        sub = record.output_subfolder
        return (root if sub == "." else root / (sub or record.id)), root

    def _execute(self, record: RunRecord, slot: WorkerSlot) -> None:
        queue = self._queue
        out_dir, root = self._out_dirs(record)
        try:
            summary = self.pool.execute(slot, record.id, record.workflow, record.targets, out_dir, root,
                                        on_event=lambda event: queue.publish(record.client_id, event))
        except WorkerLost as exc:
            self._lost(record, slot, str(exc), counts=exc.started)
            return
        except Exception as exc:
            log.exception("run %s failed on %s", record.id, slot.name)
            error = {"message": f"internal error: {type(exc).__name__}: {exc}", "detail": traceback.format_exc()}
            queue.complete(record, "failed", error=error, worker=slot.name)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
            self._release(record, slot)
            return
        try:
            self._finish(record, slot, summary)
        finally:
            self._release(record, slot)

    def _finish(self, record: RunRecord, slot: WorkerSlot, summary: dict) -> None:
        queue = self._queue
        status, error = summary["status"], summary.get("error")
        if status == "cancelled":
            if self._stopping.is_set() and record.id not in self._user_cancelled:
                queue.store.requeue(record.id)  # interrupted by shutdown, not by a user: run it again later
                return
            error = {"message": "cancelled"}
        if "ui" not in summary:  # the worker could not run it at all (invalid there, internal error)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
        queue.complete(record, status, ui=summary.get("ui") or {}, error=error, timings=summary.get("timings") or {},
                       reasons=summary.get("reasons") or {}, executed=summary.get("executed") or [],
                       cached=summary.get("cached") or [])

    def _lost(self, record: RunRecord, slot: WorkerSlot, reason: str, counts: bool = True) -> None:
        queue = self._queue
        with self._lock:
            self._runs.pop(record.id, None)
            self._threads.pop(record.id, None)
            user_cancelled = record.id in self._user_cancelled
            self._user_cancelled.discard(record.id)
        self.pool.replace(slot, reason)
        if user_cancelled:
            queue.complete(record, "cancelled", error={"message": "cancelled (its worker died while stopping)"})
            queue.publish(record.client_id, {"type": "run_cancelled", "run_id": record.id, "node": None})
        elif self._stopping.is_set() or not counts:
            queue.store.requeue(record.id)  # not the run's fault: it had not started there
        elif record.retries >= queue.max_retries:
            error = {"message": f"{reason}; the run was tried {record.retries + 1} times, not retrying it again"}
            queue.complete(record, "failed", error=error)
            queue.publish(record.client_id, {"type": "run_failed", "run_id": record.id, "error": error})
        else:
            queue.store.requeue(record.id, retry=True)
            queue.publish(record.client_id, {"type": "run_retrying", "run_id": record.id, "worker": slot.name,
                                             "retry": record.retries + 1, "reason": reason})
            queue.publish(None, {"type": "queue", **_counts(queue.store)})
        self.notify()

    def _release(self, record: RunRecord, slot: WorkerSlot) -> None:
        with self._lock:
            self._runs.pop(record.id, None)
            self._threads.pop(record.id, None)
            self._user_cancelled.discard(record.id)
        with self.pool._cond:
            if slot.running == record.id:
                slot.running = None
        self.notify()


def _counts(store: RunStore) -> dict:
    counts = store.counts()
    return {"queued": counts.get("queued", 0), "running": counts.get("running", 0)}


# -- `ditgraph run --ray` -----------------------------------------------------------------------------


def run_workflows(address: str, registry, workflows: list[tuple[int | None, Workflow]], targets: list[str] | None,
                  out_root: Path, *, json_mode: bool = False, device: str | None = None, debug: bool = False,
                  workers: int | None = None) -> int:
    """Run workflows (a --batch fans out) on Ray workers through a private run queue; the CLI's
    exit code. Output goes where a local run puts it (batch line k -> OUTPUT_DIR/batch-000k/)."""
    from app.fronts import cli

    tmp = Path(tempfile.mkdtemp(prefix="ditgraph-ray-"))
    store = RunStore(tmp / "queue.sqlite3")
    pool = None
    queue = None
    numbers: dict[str, int | None] = {}
    changed = threading.Event()
    progress = cli.ProgressLine(sys.stderr, "") if (not json_mode and sys.stderr.isatty()) else None
    try:
        # in --json mode stdout carries only JSON lines: workers' own output stays in Ray's logs
        try:
            pool = RayPool.create(address, registry, device=device, workers=workers, log_to_driver=not json_mode)
        except ConnectionError as exc:
            raise _Refused(f"--ray {address}: {exc}") from None
        dispatcher = RayDispatcher(pool, out_root)
        queue = RunQueue(store, dispatcher, validator=lambda workflow, wanted: [])

        def listen(client_id: str | None, event: dict) -> None:
            run_id = event.get("run_id")
            if event.get("type") == "queue":
                changed.set()
            if run_id not in numbers:
                return
            if json_mode:
                data = dict(event)
                if numbers[run_id] is not None:
                    data["batch"] = numbers[run_id]
                cli._emit_json(data)
            elif event.get("type") == "run_retrying":
                cli._err(f"{_label(numbers[run_id])}{event.get('reason')}; running it again")

        queue.subscribe(listen)
        for number, workflow in workflows:
            sub = "." if number is None else f"batch-{number:04d}"
            record = RunRecord(id=f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(3).hex()}",
                               workflow=workflow.to_dict(), targets=targets, output_subfolder=sub)
            numbers[record.id] = number
            store.add(record)
        if pool.wait_ready(count=1) == 0:
            errors = sorted({slot.error or "did not start in time" for slot in pool.slots})
            raise _Refused(*(f"--ray {address}: no worker started: {error}" for error in errors))
        if not json_mode:
            cli._err(f"ray: {len(workflows)} run(s) on {len(pool.slots)} worker(s)")
        queue.start()
        statuses = _wait(queue, store, numbers, changed, out_root, json_mode, progress)
    except _Refused as exc:  # printed here: `python -m app.fronts.cli` and app.fronts.cli are two modules with two UsageErrors
        for message in exc.messages:
            cli._err(f"error: {message}")
        return cli.EXIT_INVALID
    finally:
        if progress is not None:
            progress.clear()
        if queue is not None:
            queue.stop(timeout=10)
        elif pool is not None:
            pool.close()
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if "cancelled" in statuses:
        return cli.EXIT_CANCELLED
    if "failed" in statuses:
        if len(workflows) > 1 and not json_mode:
            cli._err(f"{statuses.count('failed')} of {len(workflows)} runs failed")
        return cli.EXIT_FAILED
    return cli.EXIT_OK


class _Refused(Exception):
    def __init__(self, *messages: str):
        super().__init__("; ".join(messages))
        self.messages = messages


def _label(number: int | None) -> str:
    return "" if number is None else f"[line {number}] "


def _wait(queue: RunQueue, store: RunStore, numbers: dict, changed: threading.Event, out_root: Path,
          json_mode: bool, progress) -> list[str]:
    from app.fronts import cli

    reported: dict[str, str] = {}
    interrupted = False
    while len(reported) < len(numbers):
        try:
            changed.wait(0.25)
            changed.clear()
        except KeyboardInterrupt:
            if interrupted:
                cli._err("interrupted again: exiting without waiting")
                os._exit(cli.EXIT_CANCELLED)
            interrupted = True
            queue.cancel_all()
            cli._err("\ncancelling at the next step boundary (Ctrl-C again to quit now)")
            continue
        for run_id, number in numbers.items():
            if run_id in reported:
                continue
            record = store.get(run_id)
            if record is None or record.status not in ("success", "failed", "cancelled"):
                continue
            reported[run_id] = record.status
            _report(record, number, out_root, json_mode)
        if progress is not None:
            counts = store.counts()
            progress.draw(f"ray: {len(reported)}/{len(numbers)} done, {counts.get('running', 0)} running", force=True)
    return [reported[run_id] for run_id in numbers]


def _report(record: RunRecord, number: int | None, out_root: Path, json_mode: bool) -> None:
    from app.fronts import cli

    files = cli._saved_files(record.ui, out_root)
    out_dir = out_root if number is None else out_root / f"batch-{number:04d}"
    duration = (record.finished - record.started) if record.finished and record.started else 0.0
    if json_mode:
        data = {"type": "result", "run_id": record.id, "status": record.status, "executed": record.executed,
                "cached": record.cached, "duration": round(duration, 4), "ui": record.ui,
                "error": record.error and {k: v for k, v in record.error.items() if k != "detail"},
                "files": files, "output_dir": str(out_dir), "worker": record.worker, "retries": record.retries}
        if number is not None:
            data["batch"] = number
        cli._emit_json(data)
        return
    label = _label(number)
    if record.status == "success":
        cli._print(f"{label}ok: {len(record.executed)} node(s) ran, {len(record.cached)} cached, {duration:.2f} s "
                   f"on {record.worker}" + (f" (retried {record.retries}x)" if record.retries else ""))
        for file in files:
            cli._print(f"{label}saved {file}")
    elif record.status == "failed":
        cli._err(f"{label}error: {(record.error or {}).get('message')}")
    else:
        cli._err(f"{label}cancelled")
