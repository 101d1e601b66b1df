"""The persistent run queue: order, cancellation, recovery after a crash, history."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import nodes.core
import tests.fixtures._api_nodes
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.core.registry import Registry
from app.core.workflow import WorkflowError
from app.runs.events import jsonable_event
from app.runs.local import LocalDispatcher
from app.runs.queue import RunQueue
from app.runs.store import QueueLocked, RunRecord, RunStore, new_run_id
from tests.fixtures._server_helpers import count_workflow, shared_token_server, workflow


@pytest.fixture
def registry():
    registry = Registry()
    registry.add_module(nodes.core)
    registry.add_module(tests.fixtures._api_nodes)
    return registry


@pytest.fixture
def make_queue(tmp_path, registry):
    made = []

    def make(db=None, engine=None):
        engine = engine or Engine(registry, MemoCache(max_device_bytes=0), device="cpu", output_dir=tmp_path / "out")
        store = RunStore(db or tmp_path / "q.sqlite3")
        queue = RunQueue(store, LocalDispatcher(engine, poll_seconds=0.05), engine.validate)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.stop(5)
        queue.store.close()


def wait(queue: RunQueue, run_id: str, statuses=("success", "failed", "cancelled"), timeout=15) -> RunRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = queue.get(run_id)
        if record.status in statuses:
            return record
        time.sleep(0.01)
    raise AssertionError(f"{run_id} stuck in {queue.get(run_id).status}")


def test_runs_in_order_and_records_results(make_queue, tmp_path):
    queue = make_queue()
    events = []
    queue.subscribe(lambda client, event: events.append((client, event)))
    ids = [queue.submit(count_workflow(steps=2, start=i), client_id=f"c{i}").id for i in range(3)]
    assert queue.position(ids[2]) == 2
    queue.start()
    records = [wait(queue, run_id) for run_id in ids]
    assert [r.status for r in records] == ["success"] * 3
    assert records[0].started <= records[1].started <= records[2].started
    assert records[1].ui["4"]["text"] == ["3"]
    assert set(records[0].timings) == {"1", "2", "3", "4"} and records[0].reasons["1"]
    for record in records:  # each run writes into its own folder
        assert (tmp_path / "out" / record.id / "text_00001.txt").is_file()
    started = [(c, e["run_id"]) for c, e in events if e["type"] == "run_started"]
    assert started == [(f"c{i}", ids[i]) for i in range(3)]
    history, total = queue.store.history(limit=2)
    assert total == 3 and [r.id for r in history] == ids[:0:-1]


def test_invalid_workflow_is_not_queued(make_queue):
    queue = make_queue()
    with pytest.raises(WorkflowError) as caught:
        queue.submit(workflow({"1": {"type": "SlowCount", "inputs": {"steps": -3}}}))
    assert any(p.input == "steps" for p in caught.value.problems)
    assert queue.store.counts() == {}


def test_cancel_queued_and_running(make_queue):
    queue = make_queue()
    queue.start()
    slow = queue.submit(count_workflow(steps=500, delay=0.01)).id
    waiting = queue.submit(count_workflow(steps=1, start=5)).id
    wait(queue, slow, ("running",))
    assert queue.cancel(waiting) == "cancelled"
    assert queue.cancel(slow) == "cancelling"
    assert wait(queue, slow).status == "cancelled"
    assert queue.get(waiting).status == "cancelled" and queue.get(waiting).started is None
    assert queue.cancel("nope") is None
    # the engine keeps serving after a cancellation
    assert wait(queue, queue.submit(count_workflow(steps=1, start=7)).id).status == "success"


def test_cancel_all(make_queue):
    queue = make_queue()
    queue.start()
    ids = [queue.submit(count_workflow(steps=500, delay=0.01, start=i)).id for i in range(3)]
    wait(queue, ids[0], ("running",))
    answer = queue.cancel_all()
    assert answer["cancelling"] == [ids[0]] and sorted(answer["cancelled"]) == sorted(ids[1:])
    assert [wait(queue, i).status for i in ids] == ["cancelled"] * 3


def test_failure_keeps_the_worker_alive(make_queue):
    queue = make_queue()
    queue.start()
    bad = queue.submit(workflow({"1": {"type": "Fail", "inputs": {"message": "nope"}},
                                 "2": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}}}))
    record = wait(queue, bad.id)
    assert record.status == "failed" and record.error["node"] == "1" and "nope" in record.error["message"]
    assert wait(queue, queue.submit(count_workflow(steps=1)).id).status == "success"


def test_recovery_requeues_interrupted_runs(tmp_path, make_queue):
    db = tmp_path / "crash.sqlite3"
    store = RunStore(db)
    interrupted = store.add(RunRecord(id=new_run_id() + "a", workflow=count_workflow(steps=1)))
    assert store.claim_next("dead-worker").id == interrupted.id
    hopeless = store.add(RunRecord(id=new_run_id() + "b", workflow=count_workflow(steps=1), retries=2))
    store.claim_next("dead-worker")
    store.close()

    queue = make_queue(db=db)
    requeued, failed = queue.start()
    assert requeued == [interrupted.id] and failed == [hopeless.id]
    record = wait(queue, interrupted.id)
    assert record.status == "success" and record.retries == 1
    assert queue.get(hopeless.id).status == "failed" and "not retrying" in queue.get(hopeless.id).error["message"]


def test_graceful_stop_requeues_the_running_run(make_queue, tmp_path):
    db = tmp_path / "graceful.sqlite3"
    queue = make_queue(db=db)
    queue.start()
    slow = queue.submit(count_workflow(steps=10000, delay=0.01, start=1)).id
    wait(queue, slow, ("running",))
    queue.stop(10)
    record = queue.get(slow)
    assert record.status == "queued" and record.retries == 0 and record.started is None
    again = make_queue(db=db)
    again.start()
    wait(again, slow, ("running",))  # picked up again by the next start
    assert again.cancel(slow) == "cancelling"
    assert wait(again, slow).status == "cancelled"  # a user's cancel is final


def test_store_is_exclusive_and_wal(tmp_path):
    first = RunStore(tmp_path / "x.sqlite3", exclusive=True)
    try:
        with pytest.raises(QueueLocked):
            RunStore(tmp_path / "x.sqlite3", exclusive=True)
        assert first._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        first.close()
    RunStore(tmp_path / "x.sqlite3", exclusive=True).close()  # released with the first


def test_concurrent_submissions(make_queue):
    queue = make_queue()
    queue.start()
    ids, errors = [], []

    def submit(i):
        try:
            ids.append(queue.submit(count_workflow(steps=1, start=100 + i)).id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(ids)) == 20
    assert all(wait(queue, i).status == "success" for i in ids)


def test_jsonable_event_encodes_previews():
    import numpy as np

    event = jsonable_event({"type": "progress", "preview": np.zeros((600, 300, 3), np.uint8), "eta": float("nan")})
    assert event["preview"].startswith("data:image/png;base64,") and event["eta"] is None
    assert "preview" not in jsonable_event({"type": "progress", "preview": object()})


def test_server_resumes_queue_after_sigkill():
    server = shared_token_server()  # the token server's queue; it keeps serving afterwards
    try:
        with server.client() as client:
            done = client.post("/api/runs", json={"workflow": count_workflow(steps=1, start=1000)}).json()["run_id"]
            server.wait_run(client, done)
            slow = client.post("/api/runs", json={"workflow": count_workflow(steps=60, delay=0.05, start=1)}).json()["run_id"]
            queued = [client.post("/api/runs", json={"workflow": count_workflow(steps=2, start=i)}).json()["run_id"]
                      for i in (2, 3)]
            server.wait_run(client, slow, until=("running",))
        server.kill()

        server.start()
        with server.client() as client:
            resumed = server.wait_run(client, slow, timeout=30)
            assert resumed["status"] == "success" and resumed["retries"] == 1
            assert resumed["ui"]["4"]["text"] == ["61"]
            for run_id, expected in zip(queued, ("4", "5"), strict=True):
                record = server.wait_run(client, run_id, timeout=30)
                assert record["status"] == "success" and record["ui"]["4"]["text"] == [expected]
            history = client.get("/api/runs", params={"limit": 10}).json()
            assert {done, slow, *queued} <= {r["run_id"] for r in history["history"]}
            assert client.get(f"/api/runs/{done}").json()["status"] == "success"  # history survived
    finally:
        if server.process.poll() is not None:
            server.start()


def test_stop_between_claim_and_start_requeues(make_queue):
    """The graceful-stop race: stop() after a claim but before execution starts must requeue."""
    queue = make_queue()
    dispatcher = queue.dispatcher
    claimed, proceed = threading.Event(), threading.Event()
    register, execute = dispatcher._register, dispatcher._execute

    def held_register(record):
        register(record)
        claimed.set()

    def held_execute(record):
        proceed.wait(10)
        execute(record)

    dispatcher._register, dispatcher._execute = held_register, held_execute
    run_id = queue.submit(count_workflow(steps=1)).id
    queue.start()
    assert claimed.wait(10)
    stopper = threading.Thread(target=queue.stop, args=(10,))
    stopper.start()
    while not dispatcher._stopping.is_set():
        time.sleep(0.01)
    proceed.set()
    stopper.join()
    record = queue.get(run_id)
    assert record.status == "queued" and record.retries == 0 and record.started is None


def test_system_exit_in_a_node_fails_the_run_and_the_worker_keeps_serving(make_queue):
    queue = make_queue()
    queue.start()
    bad = queue.submit(workflow({"1": {"type": "Exit", "inputs": {"code": 3}},
                                 "2": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}}}))
    record = wait(queue, bad.id)
    assert record.status == "failed" and "SystemExit" in record.error["message"]
    assert wait(queue, queue.submit(count_workflow(steps=1)).id).status == "success"


def test_watchdog_fails_a_stalled_run_then_the_queue_goes_on(tmp_path, registry):
    engine = Engine(registry, MemoCache(max_device_bytes=0), device="cpu", output_dir=tmp_path / "out")
    dispatcher = LocalDispatcher(engine, poll_seconds=0.05, watch_seconds=0.05, stall_seconds=0.5)
    queue = RunQueue(RunStore(tmp_path / "q.sqlite3"), dispatcher, engine.validate)
    try:
        queue.start()
        stalled = queue.submit(count_workflow(steps=1, delay=2.0)).id  # no event for 2 s
        record = wait(queue, stalled, timeout=10)
        assert record.status == "failed" and "no progress" in record.error["message"]
        assert wait(queue, queue.submit(count_workflow(steps=1, start=9)).id).status == "success"
        assert queue.get(stalled).status == "failed"  # the stalled run's late end does not overwrite it
    finally:
        queue.stop(5)
        queue.store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_watchdog_restarts_a_dead_worker(make_queue):
    queue = make_queue()
    queue.dispatcher.watch_seconds = 0.05
    claim = queue.claim

    def dying_claim(*args):
        queue.claim = claim
        raise SystemExit("the worker thread dies here")

    queue.claim = dying_claim
    queue.start()
    assert wait(queue, queue.submit(count_workflow(steps=1)).id).status == "success"
    assert queue.dispatcher.restarts == 1


def _stage_workflow(markers: Path, stage: str) -> dict:
    """SlowCount -> IntToText -> SaveText, with Mark nodes that hold the run at ``stage`` (first try only)."""
    hold = {"claimed": ("0", 30.0), "after_save": ("5", 30.0)}.get(stage, (None, 0.0))
    return workflow({
        "0": {"type": "Mark", "inputs": {"marker": str(markers / "started"), "seconds": 30.0 if hold[0] == "0" else 0.0}},
        "1": {"type": "SlowCount", "inputs": {"steps": 40, "delay": 0.05, "start": {"from": ["0", "value"]}}},
        "2": {"type": "IntToText", "inputs": {"value": {"from": ["1", "value"]}}},
        "3": {"type": "SaveText", "inputs": {"text": {"from": ["2", "text"]}, "prefix": "once"}},
        "5": {"type": "Mark", "inputs": {"after": {"from": ["3", "path"]}, "marker": str(markers / "saved"),
                                         "seconds": 30.0 if hold[0] == "5" else 0.0}},
    })


@pytest.mark.parametrize("stage", ["claimed", "sampling", "after_save", "after_record"])
def test_kill_9_at_each_stage_gives_each_run_exactly_its_outputs(tmp_path, stage):
    from tests.fixtures._server_helpers import ServerProcess

    server = ServerProcess(tmp_path / "server").start()
    markers = tmp_path / "markers"
    markers.mkdir()
    try:
        with server.client() as client:
            run_id = client.post("/api/runs", json={"workflow": _stage_workflow(markers, stage)}).json()["run_id"]
            marker = {"claimed": "started", "sampling": "started", "after_save": "saved"}.get(stage)
            deadline = time.monotonic() + 30
            while marker and not (markers / marker).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if stage == "sampling":
                time.sleep(0.5)  # inside SlowCount's 2 s of steps
            if stage == "after_record":
                server.wait_run(client, run_id)
        server.kill()
        server.start()
        with server.client() as client:
            record = server.wait_run(client, run_id, timeout=60)
        assert record["status"] == "success", record
        assert record["retries"] == (0 if stage == "after_record" else 1)
        files = sorted(p.relative_to(server.output_dir).as_posix() for p in server.output_dir.rglob("*") if p.is_file())
        assert files == [f"{run_id}/once_00001.txt"], files  # no second copy, no .tmp, nothing staged
        assert [o["path"] for o in record["outputs"]] == [f"{run_id}/once_00001.txt"]
    finally:
        server.stop()
