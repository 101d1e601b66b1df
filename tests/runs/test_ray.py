"""Scale-out on Ray: a local 2-CPU cluster on 127.0.0.1, two CPU workers with their own engines.

Batches fan out with outputs identical to single-process runs, repeated runs of a workflow go
to the worker that holds its results, a worker killed mid-run has its run requeued and
finished elsewhere (and is replaced), and the CLI's ``--ray`` path runs a batch. One cluster
and one pool serve the whole module to keep it quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from app.core import paths  # noqa: E402
from app.core.executor import Engine  # noqa: E402
from app.core.memo import MemoCache  # noqa: E402
from app.core.plugins import make_registry  # noqa: E402
from app.fronts.cli import main as cli_main  # noqa: E402
from app.runs.queue import RunQueue  # noqa: E402
from app.runs.store import RunRecord, RunStore  # noqa: E402

REPO = paths.REPO_ROOT
FINISHED = ("success", "failed", "cancelled")
GIB = 1 << 30
ENGINE_OPTIONS = {"memory": {"vram": 8 * GIB, "reserve": GIB}, "cache_policy": "lru:1G"}


def workflow(seed: int = 0, size: int = 32, steps: int = 4, step_seconds: float = 0.0, load_seconds: float = 0.3) -> dict:
    return {
        "format": "ditgraph/workflow", "version": 1, "meta": {"name": f"ray-test-{size}"},
        "nodes": {
            "1": {"type": "FakeModelLoad", "inputs": {"size": size, "load_seconds": load_seconds}},
            "2": {"type": "FakeRender", "inputs": {"model": {"from": ["1", "model"]}, "seed": seed, "steps": steps,
                                                   "step_seconds": step_seconds}},
            "3": {"type": "SaveImage", "inputs": {"images": {"from": ["2", "image"]}, "filename_prefix": "ray"}},
        },
    }


NO_RAY_CHECK = """
import sys
from app.fronts.cli import main
code = main(['run', sys.argv[1], '--plugin', 'tests.fixtures.ray_nodes', '--output-dir', sys.argv[2]])
assert code == 0, code
import app.fronts.http.app
assert 'ray' not in sys.modules, 'a normal run imported ray'
"""


@pytest.fixture(scope="module")
def no_ray_check(tmp_path_factory):
    """A normal `ditgraph run` in a fresh interpreter, started early so it overlaps the cluster start."""
    folder = tmp_path_factory.mktemp("no-ray")
    graph = folder / "graph.json"
    graph.write_text(json.dumps(workflow(size=8, load_seconds=0)))
    process = subprocess.Popen([sys.executable, "-c", NO_RAY_CHECK, str(graph), str(folder / "out")], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    yield process
    if process.poll() is None:
        process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def registry_and_cluster(no_ray_check):
    holder = {}
    loader = threading.Thread(target=lambda: holder.update(registry=make_registry(["tests.fixtures.ray_nodes"])))
    loader.start()  # importing the node library overlaps the cluster start
    # a short temp dir: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="dgray-", dir="/tmp")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                       _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
                       runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, logging_level="warning")
    loader.join()
    try:
        yield holder["registry"], context
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(registry_and_cluster):
    return registry_and_cluster[1]


@pytest.fixture(scope="module")
def registry(registry_and_cluster):
    return registry_and_cluster[0]


@pytest.fixture(scope="module")
def pool(cluster, registry):
    from app.runs.ray_pool import RayPool

    # half a CPU each, so the CLI test's own pool fits beside this one on the 2-CPU cluster; the
    # engine options are what `--vram 8GB --reserve-vram 1GB --cache lru:1G` make
    pool = RayPool(registry, workers=2, cpus_per_worker=0.5, device="cpu", engine_options=ENGINE_OPTIONS)
    pool.start()
    try:
        assert pool.wait_ready(timeout=120) == 2, pool.describe()
        yield pool
    finally:
        pool.close()


@pytest.fixture
def make_queue(pool, registry, tmp_path):
    from app.runs.ray_dispatch import RayDispatcher

    made = []

    def make():
        validator = Engine(registry, MemoCache(max_device_bytes=0), device="cpu").validate
        queue = RunQueue(RunStore(tmp_path / "queue.sqlite3"), RayDispatcher(pool, tmp_path / "out", poll_seconds=0.1,
                                                                            close_pool=False), validator)
        events: list[tuple[str | None, dict]] = []
        queue.subscribe(lambda client, event: events.append((client, event)))
        queue.start()
        made.append(queue)
        return queue, events

    yield make
    for queue in made:
        queue.stop(10)
        queue.store.close()


def wait_all(queue: RunQueue, run_ids: list[str], timeout: float = 60) -> list[RunRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [queue.get(run_id) for run_id in run_ids]
        if all(r.status in FINISHED for r in records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"runs not finished: {[(r.id, r.status) for r in records]}")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def saved_png(out_root: Path, record: RunRecord) -> Path:
    entries = record.ui["3"]["images"]
    assert len(entries) == 1
    return out_root / entries[0]["path"]


def test_batch_fans_out_with_outputs_identical_to_one_process(make_queue, registry, tmp_path):
    queue, events = make_queue()
    documents = [workflow(seed=seed) for seed in range(8)]
    ids = [queue.submit(document, client_id=f"client-{i}").id for i, document in enumerate(documents)]
    records = wait_all(queue, ids)
    assert [r.status for r in records] == ["success"] * 8, [r.error for r in records]
    assert {r.worker for r in records} == {"ray:w0", "ray:w1"}  # both workers took part

    local = Engine(registry, MemoCache(max_device_bytes=0), device="cpu", output_dir=tmp_path / "local")
    for i, (document, record) in enumerate(zip(documents, records, strict=True)):
        result = local.run(document, output_dir=tmp_path / "local" / str(i)).raise_for_status()
        assert np.array_equal(pixels(saved_png(tmp_path / "out", record)),
                              pixels(tmp_path / "local" / str(i) / result.ui["3"]["images"][0]["filename"]))
        # each run wrote into its own folder, once
        assert (tmp_path / "out" / record.id / "renders.txt").read_text().split() == [record.id]

    # the submitting client saw the engine's events, in order, from the worker
    mine = [e for client, e in events if client == "client-3" and e.get("run_id") == ids[3]]
    kinds = [e["type"] for e in mine]
    assert kinds[0] == "run_queued" and kinds[-1] == "run_finished", kinds
    assert "progress" in kinds and "node_started" in kinds
    started = next(e for e in mine if e["type"] == "run_started")
    assert started["worker"] == records[3].worker
    finished_node = next(e for e in mine if e["type"] == "node_finished" and e["node"] == "3")
    assert finished_node["ui"]["images"][0]["path"].startswith(ids[3] + "/")


def test_workers_engines_get_the_budget_and_cache_policy(pool):
    """`serve|run --ray --vram ...`: each worker's Engine is built with the same options as a local one."""
    for worker in pool.describe()["workers"]:
        assert (worker["vram"], worker["reserve_vram"], worker["cache_policy"]) == (8 * GIB, GIB, f"lru:{GIB}")
        assert worker["memo_max_bytes"] == GIB  # a size given is the worker's own; only the default is shared


def test_workers_on_one_machine_share_its_default_memo_ram_budget():
    from app.runs.ray_worker import ram_share

    assert ram_share({"CPU": 1.0, "GPU": 1.0}, {"CPU": 64.0, "GPU": 8.0}) == 1 / 8  # one GPU of eight
    assert ram_share({"CPU": 0.5}, {"CPU": 2.0}) == 0.25  # CPU workers: their CPUs of the node's
    assert ram_share({}, {"CPU": 2.0}) == 1.0


def test_repeated_runs_of_a_workflow_go_to_the_worker_holding_its_cache(make_queue, pool):
    queue, _ = make_queue()
    records = []
    for seed in range(4):  # one after another: both workers are idle each time
        run_id = queue.submit(workflow(seed=seed, size=48)).id
        records.extend(wait_all(queue, [run_id]))
    assert all(r.status == "success" for r in records)
    first = records[0].worker
    assert all(r.worker == first for r in records), [r.worker for r in records]
    assert "1" in records[0].executed
    for record in records[1:]:
        assert "1" in record.cached and record.reasons["1"] == "cache hit"
        assert "2" in record.executed  # a new seed renders anew

    # placement by score: the holder scores the model's load time, the other worker nothing
    holder = next(s for s in pool.slots if s.name == first)
    other = next(s for s in pool.slots if s is not holder)
    assert pool.score(holder, workflow(seed=99, size=48), None) >= 0.3
    assert pool.score(other, workflow(seed=99, size=48), None) == 0
    assert pool.choose(workflow(seed=99, size=48), None, [other, holder]) is holder


def test_a_worker_killed_mid_run_is_replaced_and_its_run_finishes_elsewhere(make_queue, pool, tmp_path):
    queue, events = make_queue()
    step_seen = threading.Event()
    queue.subscribe(lambda client, event: step_seen.set() if event.get("type") == "progress"
                    and event.get("step", 0) >= 2 else None)
    run_id = queue.submit(workflow(seed=5, size=64, steps=25, step_seconds=0.1), client_id="victim").id
    assert step_seen.wait(60), "the run never reported progress"
    record = queue.get(run_id)
    assert record.status == "running"
    victim = next(s for s in pool.slots if s.name == record.worker)
    os.kill(victim.info["pid"], signal.SIGKILL)

    record = wait_all(queue, [run_id], timeout=90)[0]
    assert record.status == "success", record.error
    assert record.retries == 1
    assert record.worker != victim.name  # the other worker took it while the victim restarted
    kinds = [e["type"] for client, e in events if e.get("run_id") == run_id]
    assert "run_retrying" in kinds
    retrying = next(e for client, e in events if e.get("type") == "run_retrying")
    assert retrying["worker"] == victim.name and retrying["retry"] == 1 and client_of(events, retrying) == "victim"
    # completed once: one finished render, one image
    run_dir = tmp_path / "out" / run_id
    assert (run_dir / "renders.txt").read_text().split() == [run_id]
    assert len(list(run_dir.glob("*.png"))) == 1
    # the dead actor was replaced by a fresh one
    assert pool.wait_ready(timeout=90) == 2
    assert victim.restarts == 1 and victim.info["pid"] != 0


def test_a_run_retried_after_its_worker_saved_an_image_publishes_each_file_once(make_queue, pool, tmp_path):
    """Killed after SaveImage wrote and before the run was recorded: the retry's files, once."""
    queue, events = make_queue()
    document = workflow(size=56, load_seconds=0)
    document["nodes"].update({  # after node 3 saved: a slow second render, where the worker dies
        "4": {"type": "FakeRender", "inputs": {"model": {"from": ["1", "model"]}, "seed": 1, "steps": 40,
                                                "step_seconds": 0.1}},
        "5": {"type": "SaveImage", "inputs": {"images": {"from": ["4", "image"]}, "filename_prefix": "second"}}})
    saved = threading.Event()
    queue.subscribe(lambda client, event: saved.set() if event.get("type") == "progress" and event.get("node") == "4"
                    and event.get("step", 0) >= 2 else None)
    run_id = queue.submit(document).id
    assert saved.wait(60), "the second render never reported progress"
    first_try = [e for _, e in events if e.get("type") == "node_finished" and e.get("node") == "3"]
    assert len(first_try) == 1  # the first try had saved its image when its worker died
    os.kill(next(s for s in pool.slots if s.name == queue.get(run_id).worker).info["pid"], signal.SIGKILL)

    record = wait_all(queue, [run_id], timeout=90)[0]
    assert record.status == "success" and record.retries == 1, record.error
    run_dir = tmp_path / "out" / run_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["ray_00001.png", "renders.txt", "second_00001.png"]
    assert (run_dir / "renders.txt").read_text().split() == [run_id, run_id]  # the retry's two renders only
    assert [entry["path"] for node in ("3", "5") for entry in record.ui[node]["images"]] == [
        f"{run_id}/ray_00001.png", f"{run_id}/second_00001.png"]
    assert not (tmp_path / "out" / ".staging" / run_id).exists()
    assert pool.wait_ready(timeout=90) == 2


def test_cancelling_a_run_on_a_worker_stops_it_at_a_step(make_queue, pool):
    queue, events = make_queue()
    step_seen = threading.Event()
    queue.subscribe(lambda client, event: step_seen.set() if event.get("type") == "progress" else None)
    run_id = queue.submit(workflow(seed=6, size=40, steps=200, step_seconds=0.05)).id
    assert step_seen.wait(60)
    assert queue.cancel(run_id) == "cancelling"
    record = wait_all(queue, [run_id], timeout=30)[0]
    assert record.status == "cancelled" and record.error == {"message": "cancelled"}
    assert "run_cancelled" in [e["type"] for _, e in events if e.get("run_id") == run_id]
    deadline = time.monotonic() + 10
    while len(pool.idle()) < 2 and time.monotonic() < deadline:  # the worker is free again
        time.sleep(0.02)
    assert len(pool.idle()) == 2


def client_of(events, event) -> str | None:
    return next(client for client, e in events if e is event)


def test_cli_run_batch_on_ray(cluster, pool, tmp_path, capsys, monkeypatch):
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(workflow(size=16)))
    batch = tmp_path / "seeds.jsonl"
    batch.write_text("".join(json.dumps({"2.seed": seed}) + "\n" for seed in range(3)))
    monkeypatch.setattr(paths, "_overrides", dict(paths._overrides))  # the CLI sets folders for the process
    monkeypatch.setenv("DITGRAPH_RAY_WORKERS", "2")
    monkeypatch.setenv("DITGRAPH_RAY_CPUS_PER_WORKER", "0.5")
    out = tmp_path / "cli-out"
    from app.runs.ray_pool import RayPool

    made, create = {}, RayPool.create.__func__
    monkeypatch.setattr(RayPool, "create", classmethod(lambda cls, *a, **kw: (made.update(kw), create(cls, *a, **kw))[1]))
    code = cli_main(["run", str(graph), "--batch", str(batch), "--plugin", "tests.fixtures.ray_nodes", "--output-dir", str(out),
                     "--json", "--ray", "auto", "--vram", "8GB", "--reserve-vram", "1GB", "--cache", "lru:1G"])
    assert made["engine_options"] == ENGINE_OPTIONS
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 0, lines[-3:]
    results = sorted((r for r in lines if r["type"] == "result"), key=lambda r: r["batch"])
    assert [r["batch"] for r in results] == [1, 2, 3] and all(r["status"] == "success" for r in results)
    for r in results:
        assert len(r["files"]) == 1 and Path(r["files"][0]).parent == out / f"batch-{r['batch']:04d}"
        assert any(e.get("type") == "progress" and e.get("batch") == r["batch"] for e in lines)


def test_cli_video_run_on_ray_draws_the_workers_step_bar(cluster, pool, tmp_path, capsys, monkeypatch):
    """`ditgraph run --ray` of a tiny Wan video workflow on a terminal: the worker's step events,
    relayed through the run queue, draw the same bar as a local run, after the batch's counts."""
    from tests.fixtures.terminal import Terminal
    from tests.fixtures.tiny_video import STEPS, save_video_family
    from tests.fixtures.tiny_video import workflow as video_workflow

    save_video_family("wan", tmp_path / "models" / "checkpoints" / "tiny-wan")
    graph = tmp_path / "wan.json"
    graph.write_text(json.dumps(video_workflow("wan")))
    monkeypatch.setattr(paths, "_overrides", dict(paths._overrides))
    monkeypatch.setenv("DITGRAPH_TEMP", str(tmp_path / "temp"))
    monkeypatch.setenv("DITGRAPH_RAY_WORKERS", "1")
    monkeypatch.setenv("DITGRAPH_RAY_CPUS_PER_WORKER", "0.5")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = cli_main(["run", str(graph), "--models", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out"),
                     "--device", "cpu", "--ray", "auto"])
    out = capsys.readouterr().out
    assert code == 0, (out, terminal.getvalue()[-2000:])
    bars = [line for line in terminal.lines() if line.startswith("ray: 0/1 done, 1 running · nodes ")
            and "sample Sampler [" in line]
    assert any(f"[{'#' * 24}] {STEPS}/{STEPS}" in line for line in bars), terminal.lines()
    assert any(line.startswith("saved ") and line.endswith(".mp4 (video: 9 frames at 8 fps, 16x16)")
               for line in out.splitlines()), out


def test_a_normal_run_does_not_import_ray(no_ray_check):
    _, stderr = no_ray_check.communicate(timeout=120)
    assert no_ray_check.returncode == 0, stderr[-2000:]


def test_serve_with_ray_dispatches_the_queue_to_the_workers(pool, registry, tmp_path, monkeypatch):
    """`ditgraph serve --ray`: Settings.ray makes the server's queue dispatch through Ray (the
    pool is this module's, so no new actors start)."""
    from app.fronts.http.settings import Settings
    from app.fronts.http.state import AppState
    from app.runs.ray_pool import RayPool

    asked = {}
    monkeypatch.setattr(RayPool, "create", classmethod(lambda cls, address, reg, **kw: (asked.update(
        address=address, registry=reg, **kw), pool)[1]))
    monkeypatch.setattr(pool, "close", lambda: None)  # the module's pool outlives this server
    engine = Engine(registry, MemoCache(max_device_bytes=0), device="cpu", output_dir=tmp_path / "out")
    state = AppState(engine, Settings(db_path=tmp_path / "q.sqlite3", workflows_dir=tmp_path / "workflows",
                                      ray="10.1.2.3:6379", ray_device="cpu", ray_engine=ENGINE_OPTIONS))
    state.start()
    try:
        assert asked == {"address": "10.1.2.3:6379", "registry": registry, "device": "cpu",
                         "engine_options": ENGINE_OPTIONS}
        status = state.queue.dispatcher.describe()
        assert status["kind"] == "ray" and len(status["workers"]) == 2
        record = wait_all(state.queue, [state.queue.submit(workflow(seed=11, size=24)).id])[0]
        assert record.status == "success" and record.worker in ("ray:w0", "ray:w1")
        assert (tmp_path / "out" / record.id / "renders.txt").is_file()
    finally:
        state.stop()


class _StubPool:
    """Stands in for a RayPool where only the bookkeeping of lost workers is under test."""

    def __init__(self):
        self.replaced: list[str] = []

    def on_change(self, callback) -> None:
        pass

    def replace(self, slot, reason: str) -> None:
        self.replaced.append(slot.name)


def test_worker_deaths_count_as_retries_up_to_the_limit(tmp_path):
    from app.runs.ray_dispatch import RayDispatcher
    from app.runs.ray_pool import WorkerSlot

    pool = _StubPool()
    dispatcher = RayDispatcher(pool, tmp_path / "out", close_pool=False)
    queue = RunQueue(RunStore(tmp_path / "q.sqlite3"), dispatcher, lambda workflow, targets: [], max_retries=2)
    dispatcher._queue = queue  # not started: runs are claimed by hand below
    events = []
    queue.subscribe(lambda client, event: events.append(event))
    run_id = queue.submit(workflow(), client_id="c").id
    slot = WorkerSlot(0)
    try:
        # died before the run started there: not the run's fault, no retry counted
        dispatcher._lost(queue.claim(slot.name), slot, "gone", counts=False)
        assert queue.get(run_id).status == "queued" and queue.get(run_id).retries == 0
        for attempt in (1, 2):  # died mid-run: counted, requeued at its place
            dispatcher._lost(queue.claim(slot.name), slot, f"killed {attempt}")
            record = queue.get(run_id)
            assert record.status == "queued" and record.retries == attempt
        dispatcher._lost(queue.claim(slot.name), slot, "killed 3")
        record = queue.get(run_id)
        assert record.status == "failed" and "tried 3 times" in record.error["message"]
        assert [e["retry"] for e in events if e["type"] == "run_retrying"] == [1, 2]
        assert events[-1]["type"] in ("run_failed", "queue") and pool.replaced == ["ray:w0"] * 4
    finally:
        queue.store.close()
