"""The driver's pool of Ray workers: their actors, readiness, restarts and cache-affine placement."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from app.core.workflow import Workflow
from app.runs.ray_worker import EngineWorker, WorkerLost, connect, node_keys, worker_config

log = logging.getLogger(__name__)

READY_TIMEOUT = float(os.environ.get("DITGRAPH_RAY_READY_TIMEOUT", "600"))
START_ATTEMPTS = 3  # per worker slot, before it is reported as failed
HIT_EPSILON = 1e-3  # a cached node counts for something even when it was instant to compute


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
                "cached_keys": len(self.keys),
                **{k: self.info.get(k) for k in ("pid", "host", "device", "gpu", "vram", "reserve_vram", "cache_policy",
                                                 "memo_max_bytes")}}


class RayPool:
    """Actors holding engines, and the placement of runs on them."""

    def __init__(self, registry, *, workers: int | None = None, device: str | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                 owns_ray: bool = False, address: str | None = None, extra_sys_path: list[str] | None = None,
                 engine_options: dict | None = None):
        self.registry = registry
        self.address = address
        self.owns_ray = owns_ray
        self.config = worker_config(registry, device, extra_sys_path, engine_options)
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
