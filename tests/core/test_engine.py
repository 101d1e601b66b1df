"""Engine: validation, memoization, eviction, cancellation, failures, plugins, saving."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading

import pytest
import torch

import nodes.core
from app.core import paths
from app.core import workflow as graph
from app.core.executor import Engine
from app.core.memo import RAM_FRACTION, MemoCache, measure, physical_ram
from app.core.registry import Registry
from app.core.workflow import Workflow, WorkflowError
from tests.fixtures import engine_nodes
from tests.fixtures.memo_values import FakeGpuValue  # noqa: F401


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.add_module(nodes.core)
    reg.add_module(engine_nodes)
    engine_nodes.calls.clear()
    engine_nodes.order.clear()
    return reg


@pytest.fixture
def engine(registry) -> Engine:
    return Engine(registry, MemoCache(max_bytes=1 << 30, max_device_bytes=0), device="cpu")


def wf(nodes: dict, name: str = "test") -> dict:
    return {"format": "ditgraph/workflow", "version": 1, "nodes": nodes, "layout": {}, "meta": {"name": name}}


def link(node_id: str, output: str = "value") -> dict:
    return {"from": [node_id, output]}


def chain() -> dict:
    """1 -> 3 <- 2, 3 -> 4 (sink), and 5 -> 6 (sink), independent of the rest."""
    return wf(
        {
            "1": {"type": "Const", "inputs": {"value": 1}},
            "2": {"type": "Const", "inputs": {"value": 2}},
            "3": {"type": "Add", "inputs": {"a": link("1"), "b": link("2")}},
            "4": {"type": "Sink", "inputs": {"value": link("3")}},
            "5": {"type": "Const", "inputs": {"value": 5}},
            "6": {"type": "Sink", "inputs": {"value": link("5")}},
        }
    )


# -- validation ------------------------------------------------------------------------------


def problems_of(registry, document, targets=None):
    return graph.validate(Workflow.from_dict(document), registry, targets)


def test_valid_workflow_has_no_problems(registry):
    assert problems_of(registry, chain()) == []


def test_every_kind_of_problem_is_reported_at_once(registry, engine):
    doc = wf(
        {
            "1": {"type": "NoSuchNode", "inputs": {}},
            "2": {"type": "Const", "inputs": {"value": 5000, "colour": "red"}},  # range + unknown input
            "3": {"type": "Add", "inputs": {"a": link("99"), "b": link("2", "nope")}},  # bad links
            "4": {"type": "Sink", "inputs": {}},  # missing required link
            "5": {"type": "Scale", "inputs": {"x": "fast", "mode": "triple"}},  # wrong type, not a choice
            "6": {"type": "LatentSink", "inputs": {"latent": link("2")}},  # INT into LATENT
            "7": {"type": "Const", "inputs": {"value": True}},  # bool is not an int
        }
    )
    problems = problems_of(registry, doc)
    kinds = {(p.node, p.input, p.kind) for p in problems}
    assert ("1", None, "unknown_type") in kinds
    assert ("2", "value", "bad_value") in kinds
    assert ("2", "colour", "unknown_input") in kinds
    assert ("3", "a", "bad_link") in kinds
    assert ("3", "b", "bad_link") in kinds
    assert ("4", "value", "missing_input") in kinds
    assert ("5", "x", "bad_value") in kinds
    assert ("5", "mode", "bad_value") in kinds
    assert ("6", "latent", "type_mismatch") in kinds
    assert ("7", "value", "bad_value") in kinds
    messages = "\n".join(map(str, problems))
    assert "above the maximum 1000" in messages and "not one of the choices" in messages
    with pytest.raises(WorkflowError) as raised:
        engine.run(doc)
    assert len(raised.value.problems) >= 10
    assert engine_nodes.calls == {}  # nothing ran


def test_cycle_is_reported_with_its_path(registry):
    doc = wf(
        {
            "a": {"type": "Add", "inputs": {"a": link("c")}},
            "b": {"type": "Add", "inputs": {"a": link("a")}},
            "c": {"type": "Add", "inputs": {"a": link("b")}},
            "s": {"type": "Sink", "inputs": {"value": link("c")}},
        }
    )
    cycles = [p for p in problems_of(registry, doc) if p.kind == "cycle"]
    assert len(cycles) == 1
    assert "a -> b -> c -> a" in cycles[0].message or "b -> c -> a -> b" in cycles[0].message or "c -> a -> b -> c" in cycles[0].message


def test_no_output_node_and_unused_nodes(registry):
    problems = problems_of(registry, wf({"1": {"type": "Const", "inputs": {}}}))
    assert [p.kind for p in problems if p.severity == "error"] == ["no_output"]
    doc = chain()
    doc["nodes"]["9"] = {"type": "Const", "inputs": {}}
    unused = [p for p in problems_of(registry, doc) if p.kind == "unused"]
    assert [(p.node, p.severity) for p in unused] == [("9", "warning")]


def test_format_errors_name_the_problem():
    with pytest.raises(WorkflowError, match="not valid JSON"):
        graph.loads("{nope")
    with pytest.raises(WorkflowError, match="'format' must be"):
        graph.loads(json.dumps({"nodes": {}}))
    with pytest.raises(WorkflowError, match="ComfyUI"):
        graph.loads(json.dumps({"3": {"class_type": "KSampler", "inputs": {}}}))
    with pytest.raises(WorkflowError, match="newer than"):
        graph.loads(json.dumps({"format": graph.FORMAT, "version": 99, "nodes": {}}))
    with pytest.raises(WorkflowError, match=r"node 2.*'type'"):
        graph.loads(json.dumps(wf({"2": {"inputs": {}}})))
    with pytest.raises(WorkflowError, match="does not exist"):
        graph.load("/nonexistent/workflow.json")


def test_migration_hook_upgrades_old_versions(monkeypatch):
    def v1_to_v2(doc):
        for node in doc["nodes"].values():
            node["inputs"] = node.pop("widgets")
        return {**doc, "version": 2}

    monkeypatch.setattr(graph, "VERSION", 2)
    monkeypatch.setitem(graph.MIGRATIONS, 1, v1_to_v2)
    old = {"format": graph.FORMAT, "version": 1, "nodes": {"1": {"type": "Const", "widgets": {"value": 3}}}}
    upgraded = Workflow.from_dict(old)
    assert upgraded.nodes["1"].inputs == {"value": 3}
    assert upgraded.to_dict()["version"] == 2


def test_json_schema_accepts_saved_workflows():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(graph.SCHEMA_PATH.read_text())
    document = Workflow.from_dict(chain()).to_dict()
    jsonschema.validate(document, schema)
    document["nodes"]["1"]["inputs"]["value"] = {"from": ["x"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


# -- memoization -----------------------------------------------------------------------------


def test_identical_rerun_executes_nothing(engine):
    first = engine.run(chain())
    assert first.status == "success" and sorted(first.executed) == ["1", "2", "3", "4", "5", "6"]
    assert first.ui["4"] == {"value": [3]}
    second = engine.run(chain())
    assert second.executed == [] and sorted(second.cached) == ["1", "2", "3", "4", "5", "6"]
    assert second.ui["4"] == {"value": [3]}  # cached output nodes still report their UI data


def test_changing_one_widget_reruns_only_its_descendants(engine):
    engine.run(chain())
    changed = chain()
    changed["nodes"]["2"]["inputs"]["value"] = 20
    result = engine.run(changed)
    assert sorted(result.executed) == ["2", "3", "4"]
    assert result.ui["4"] == {"value": [21]}
    assert result.reasons["2"] == "input 'value' changed 2 -> 20"
    assert result.reasons["3"] == "upstream of 'b' changed"
    assert engine.explain(Workflow.from_dict(changed)) == {n: "cache hit" for n in ["1", "2", "3", "4", "5", "6"]}


def test_default_written_out_is_the_same_key(engine):
    engine.run(chain())
    explicit = chain()
    explicit["nodes"]["3"]["inputs"]["a"] = link("1")
    explicit["nodes"]["5"]["inputs"] = {"value": 5}
    assert engine.run(explicit).executed == []


def test_whole_number_floats_share_a_key(engine):
    doc = wf({"1": {"type": "Scale", "inputs": {"x": 2.0}}, "2": {"type": "PreviewAny", "inputs": {"value": link("1")}}})
    assert engine.run(doc).ui["2"] == {"text": ["4.0"]}
    doc["nodes"]["1"]["inputs"]["x"] = 2  # what a browser's JSON.stringify sends for 2.0
    assert engine.run(doc).executed == []


def test_switching_workflows_keeps_both_cached(engine):
    other = wf({"x": {"type": "Const", "inputs": {"value": 7}}, "y": {"type": "Sink", "inputs": {"value": link("x")}}}, "other")
    engine.run(chain())
    engine.run(other)
    assert engine.run(chain()).executed == []
    assert engine.run(other).executed == []


def test_forget_recomputes_only_the_named_nodes(engine):
    engine.run(chain())
    assert engine.forget(chain(), ["2", "3"]) == ["2", "3"]
    assert engine.forget(chain(), ["2"]) == []  # already gone
    assert sorted(engine.run(chain()).executed) == ["2", "3"]  # "4" (downstream of 3) stays cached


def test_only_requested_targets_run(engine):
    result = engine.run(chain(), targets=["6"])
    assert sorted(result.executed) == ["5", "6"]


def test_file_fingerprint_invalidation(engine, tmp_path, monkeypatch):
    paths.configure(inputs=tmp_path)
    try:
        (tmp_path / "prompt.txt").write_text("first")
        doc = wf({"r": {"type": "ReadText", "inputs": {"path": "prompt.txt"}}, "s": {"type": "TextSink", "inputs": {"text": link("r", "text")}}})
        assert engine.run(doc).ui["s"] == {"text": ["first"]}
        assert engine.run(doc).executed == []
        (tmp_path / "prompt.txt").write_text("second, longer")
        result = engine.run(doc)
        assert result.executed == ["r", "s"] and result.ui["s"] == {"text": ["second, longer"]}
        assert result.reasons["r"] == "file of 'path' changed on disk"
        (tmp_path / "prompt.txt").unlink()
        missing = graph.validate(Workflow.from_dict(doc), engine.registry)
        assert missing and "not found" in missing[0].message
        outside = tmp_path.parent / "outside.txt"
        outside.write_text("secret")
        (tmp_path / "link.txt").symlink_to(outside)
        doc["nodes"]["r"]["inputs"]["path"] = "link.txt"
        assert "outside" in graph.validate(Workflow.from_dict(doc), engine.registry)[0].message
        doc["nodes"]["r"]["inputs"]["path"] = "../outside.txt"
        assert "outside" in graph.validate(Workflow.from_dict(doc), engine.registry)[0].message
    finally:
        paths._overrides.pop("inputs", None)


# -- memory bounds ---------------------------------------------------------------------------


def blob_workflow(seed: int, kilobytes: int = 64) -> dict:
    return wf({"b": {"type": "Blob", "inputs": {"kilobytes": kilobytes, "seed": seed}}, "s": {"type": "LatentSink", "inputs": {"latent": link("b", "latent")}}})


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used(registry):
    cache = MemoCache(max_bytes=200 * 1024, max_device_bytes=0)
    engine = Engine(registry, cache, device="cpu")
    for seed in range(3):  # 3 x 64 KB tensors (+ tiny sink entries) fit in 200 KB
        engine.run(blob_workflow(seed))
    assert cache.nbytes <= cache.max_bytes and cache.stats["evictions"] == 0
    engine.run(blob_workflow(0))  # touch seed 0: now the least recently used is seed 1
    engine.run(blob_workflow(3))
    assert cache.stats["evictions"] >= 1 and cache.nbytes <= cache.max_bytes
    assert engine.run(blob_workflow(0)).executed == []
    assert "b" in engine.run(blob_workflow(1)).executed


def test_oversized_entry_is_not_cached_but_the_run_succeeds(registry):
    engine = Engine(registry, MemoCache(max_bytes=16 * 1024, max_device_bytes=0), device="cpu")
    result = engine.run(blob_workflow(1, kilobytes=64))
    assert result.status == "success" and result.ui["s"] == {"sum": 64 * 256.0}
    assert "b" in engine.run(blob_workflow(1, kilobytes=64)).executed


def versioned_workflow(seed: int, name: str = "test") -> dict:
    """A "model" that never changes beside a result that changes with the seed (as in the soak)."""
    return wf({"m": {"type": "Blob", "inputs": {"kilobytes": 64, "seed": 99}},
               "sm": {"type": "LatentSink", "inputs": {"latent": link("m", "latent")}},
               "b": {"type": "Blob", "inputs": {"kilobytes": 1, "seed": seed}},
               "s": {"type": "LatentSink", "inputs": {"latent": link("b", "latent")}}}, name)


def test_each_node_keeps_a_bounded_number_of_versions(registry):
    cache = MemoCache(max_bytes=1 << 30, max_device_bytes=0, versions=3)
    engine = Engine(registry, cache, device="cpu")
    for seed in range(20):
        engine.run(versioned_workflow(seed))
    assert len(cache) == 2 + 2 * 3  # the model and its sink, three versions of each seeded node
    assert cache.stats["superseded"] == 2 * 17 and cache.stats["evictions"] == 0
    assert engine.run(versioned_workflow(17)).executed == []  # the last three seeds are kept
    assert engine.run(versioned_workflow(0)).executed == ["b", "s"]  # an old one was dropped, not the model


def test_a_version_another_workflow_still_uses_is_kept(registry):
    engine = Engine(registry, MemoCache(max_bytes=1 << 30, max_device_bytes=0, versions=2), device="cpu")
    engine.run(versioned_workflow(100, name="a"))
    for seed in (100, 101, 102, 103):  # b's versions in "b" move past seed 100
        engine.run(versioned_workflow(seed, name="b"))
    assert engine.run(versioned_workflow(100, name="a")).executed == []


def test_the_default_ram_budget_is_a_fraction_of_this_machines_ram():
    assert MemoCache().max_bytes == int(physical_ram() * RAM_FRACTION) > 0


def test_accelerator_bytes_count_against_the_vram_budget_not_the_ram_budget():
    cache = MemoCache(max_bytes=1_000, max_device_bytes=10_000)
    model = FakeGpuValue(5_000)  # a GPU-resident model larger than the RAM budget is still kept
    assert cache.put("model", (model,)) and cache.ram_bytes == 0 and cache.device_bytes == 5_000
    assert not cache.put("too-big-for-ram", (torch.zeros(1_000),))


def test_measure_counts_shared_storage_once():
    base = torch.zeros(1024)
    assert measure((base, base[:10], base.view(32, 32)))["cpu"] == 4096
    module = torch.nn.Linear(16, 16)
    assert measure(module)["cpu"] == (16 * 16 + 16) * 4


def test_vram_budget_spills_coldest_entries_to_cpu_before_evicting():
    cache = MemoCache(max_bytes=10_000, max_device_bytes=2_500)
    values = [FakeGpuValue(1_000) for _ in range(4)]
    for i, value in enumerate(values):
        cache.put(f"k{i}", (value,))
    assert cache.device_bytes <= 2_500
    assert [v.on_gpu for v in values] == [False, False, True, True]  # coldest moved first
    assert len(cache) == 4 and cache.stats["evictions"] == 0
    cache.spill_all()
    assert cache.device_bytes == 0 and len(cache) == 4


# -- failures, cancellation, out-of-memory ---------------------------------------------------


def test_a_failing_node_fails_the_run_and_the_engine_stays_usable(engine):
    doc = wf({"1": {"type": "Const", "inputs": {"value": 1}}, "2": {"type": "Fail", "inputs": {"value": link("1"), "message": "bad input tensor"}}, "3": {"type": "Sink", "inputs": {"value": link("2")}}})
    events = []
    result = engine.run(doc, on_event=events.append)
    assert result.status == "failed"
    assert result.error["node"] == "2" and "node 2 (Fail) failed: ValueError: bad input tensor" in result.error["message"]
    assert any(e["type"] == "node_failed" and e["node"] == "2" for e in events)
    with pytest.raises(Exception, match="bad input tensor"):
        result.raise_for_status()
    assert engine.run(chain()).status == "success"
    doc["nodes"]["2"]["type"] = "Add"
    doc["nodes"]["2"]["inputs"] = {"a": link("1")}
    fixed = engine.run(doc)
    assert fixed.status == "success" and fixed.cached == ["1"]


def test_cancellation_at_a_step_boundary_keeps_the_cache_consistent(engine):
    doc = wf({"1": {"type": "Const", "inputs": {"value": 4}}, "2": {"type": "Slow", "inputs": {"value": link("1"), "steps": 10}}, "3": {"type": "Sink", "inputs": {"value": link("2")}}})
    cancel = threading.Event()
    steps = []

    def on_event(event):
        if event["type"] == "progress":
            steps.append(event["step"])
            if event["step"] == 3:
                cancel.set()

    result = engine.run(doc, cancel=cancel, on_event=on_event)
    assert result.status == "cancelled" and steps == [1, 2, 3]
    again = engine.run(doc)
    assert again.status == "success" and again.cached == ["1"] and again.executed == ["2", "3"]
    assert again.ui["3"] == {"value": [4]}


def test_out_of_memory_frees_cached_gpu_entries_and_retries_once(engine):
    gpu_value = FakeGpuValue(1_000)
    engine.cache.max_device_bytes = 10_000
    engine.cache.put("someone-elses-result", (gpu_value,))
    doc = wf({"1": {"type": "OomOnce", "inputs": {"value": 9}}, "2": {"type": "Sink", "inputs": {"value": link("1")}}})
    engine_nodes.oom_failures["left"] = 1
    result = engine.run(doc)
    assert result.status == "success" and engine_nodes.calls["1"] == 2
    assert gpu_value.on_gpu is False  # spilled to make room
    engine_nodes.oom_failures["left"] = 2
    doc["nodes"]["1"]["inputs"]["value"] = 10
    failed = engine.run(doc)
    assert failed.status == "failed" and "out of memory" in failed.error["message"]
    assert "Lower the resolution" in failed.error["message"]


def test_events_reach_every_subscriber(engine):
    seen_a, seen_b = [], []
    engine.subscribe(seen_a.append)
    unsubscribe = engine.subscribe(seen_b.append)
    engine.run(chain())
    unsubscribe()
    engine.run(chain())
    types_a = [e["type"] for e in seen_a]
    assert types_a.count("run_started") == 2 and types_a.count("node_cached") == 6
    assert [e["type"] for e in seen_b].count("run_started") == 1
    assert {e["node"] for e in seen_b if e["type"] == "node_finished"} == {"1", "2", "3", "4", "5", "6"}


def test_bypassed_node_passes_its_input_through(engine):
    doc = wf({"1": {"type": "Const", "inputs": {"value": 1}}, "2": {"type": "Increment", "inputs": {"value": link("1")}, "bypass": True}, "3": {"type": "Sink", "inputs": {"value": link("2")}}})
    result = engine.run(doc)
    assert result.ui["3"] == {"value": [1]} and "2" not in result.executed
    doc["nodes"]["2"]["bypass"] = False
    assert engine.run(doc).ui["3"] == {"value": [2]}


# -- plugins and saving ----------------------------------------------------------------------


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "goodplugin.py").write_text(textwrap.dedent('''
        from app.core.registry import node
        from app.core.types import INT
        @node(outputs={"value": INT}, category="plugin")
        def PluginConst(value: int = 42) -> int:
            """From a plugin."""
            return value
    '''))
    (tmp_path / "badplugin.py").write_text("raise ImportError('missing dependency xyz')\n")
    dist = tmp_path / "ditgraph_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ditgraph-test-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ditgraph.nodes]\ngood = goodplugin\nbad = badplugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    registry.load_plugins()
    assert registry.get("PluginConst") is not None
    assert [e.source for e in registry.load_errors] == ["plugin bad (badplugin)"]
    assert "missing dependency xyz" in registry.load_errors[0].message
    sys.modules.pop("goodplugin", None)


def test_builtin_library_loads_without_errors():
    registry = Registry()
    registry.load_package("nodes")
    assert registry.load_errors == [], [e.message for e in registry.load_errors]
    assert registry.get("PrimitiveInt") is not None


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "flow.json"
    workflow = Workflow.from_dict(chain())
    graph.save(workflow, target)
    assert graph.load(target).to_dict() == workflow.to_dict()
    original = target.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    changed = Workflow.from_dict(chain())
    changed.meta["name"] = "changed"
    with pytest.raises(OSError, match="disk full"):
        graph.save(changed, target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["flow.json"]


def test_catalogue_is_derived_from_declarations(registry):
    entry = next(e for e in registry.catalogue() if e["type"] == "Scale")
    mode = next(i for i in entry["inputs"] if i["name"] == "mode")
    assert mode["choices"] == ["double", "half"] and mode["default"] == "double" and mode["widget"]
    seed = next(i for i in next(e for e in registry.catalogue() if e["type"] == "Seed")["inputs"])
    assert seed["seed"] is True and seed["min"] == 0
    json.dumps(registry.catalogue())
