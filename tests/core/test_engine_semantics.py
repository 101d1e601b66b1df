"""Engine semantics: lazy inputs, list mapping, node expansion, async nodes, always_run."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import pytest
import torch

import nodes.image
from app.core import paths
from app.core.context import current
from app.core.executor import Engine
from app.core.registry import NodeResult, node
from app.core.types import IMAGE, INT, STRING, Spec
from app.core.workflow import Workflow
from tests.core._engines import small_engine
from tests.fixtures import engine_nodes

rendezvous: dict[str, asyncio.Event] = {}
stamps: list[str] = []


@node(category="test", outputs={"value": INT})
async def AsyncMeet(value: int = 0, wait_for: str = "", signal: str = "") -> int:
    """Sets its own event, then waits for another async node's: finishes only if both run at once."""
    rendezvous.setdefault(signal, asyncio.Event()).set()
    await asyncio.wait_for(rendezvous.setdefault(wait_for, asyncio.Event()).wait(), timeout=5)
    return value


@node(category="test", outputs={"text": STRING}, always_run=True)
def Clock() -> str:
    stamps.append(current().run_id)
    return f"tick {len(stamps)}"


@node(category="test", outputs={}, output_node=True)
def CollectList(values: Annotated[Any, Spec(whole_list=True)]) -> NodeResult:
    """Receives a whole list (no mapping)."""
    return NodeResult((), {"values": [list(values)]})


@node(category="test", outputs={"image": IMAGE})
def SeedImage(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, 4, 4, 3), (seed % 10) / 10)


@node(category="test", outputs={"value": INT})
def ListIndex(value: int = 0) -> int:
    """Its value times 100 plus the list element index it ran for."""
    ctx = current()
    return value * 100 + (ctx.list_index if ctx.list_index is not None else 99)


def link(node_id: str, output: str = "value") -> dict:
    return {"from": [node_id, output]}


def wf(nodes_: dict) -> dict:
    return {"format": "ditgraph/workflow", "version": 2, "nodes": nodes_, "meta": {"name": "semantics"}}


@pytest.fixture
def engine() -> Engine:
    return small_engine(nodes.image, sys.modules[__name__])


# -- lazy inputs -----------------------------------------------------------------------------------


def test_if_runs_only_the_chosen_branch_and_the_other_need_not_be_runnable(engine, tmp_path):
    paths.configure(inputs=tmp_path)
    try:
        doc = wf({
            "cond": {"type": "PrimitiveBoolean", "inputs": {"value": True}},
            "yes": {"type": "Const", "inputs": {"value": 1}},
            "no": {"type": "ReadText", "inputs": {"path": "missing.txt"}},  # would fail if run
            "if": {"type": "If", "inputs": {"condition": link("cond"), "if_true": link("yes"), "if_false": link("no", "text")}},
            "s": {"type": "PreviewAny", "inputs": {"value": link("if")}},
        })
        result = engine.run(doc)
        assert result.status == "success" and result.ui["s"] == {"text": ["1"]}
        assert "no" not in engine_nodes.calls and result.skipped == ["no"] and result.reasons["no"] == "not needed"
        assert engine.explain(Workflow.from_dict(doc))["no"] == "not needed"
        doc["nodes"]["cond"]["inputs"]["value"] = False  # now the broken branch is needed: it fails, by name
        failed = engine.run(doc)
        assert failed.status == "failed" and failed.error["node"] == "no" and "not found" in failed.error["message"]
    finally:
        paths._overrides.pop("inputs", None)


def test_switch_and_select_first_available(engine):
    doc = wf({
        "a": {"type": "Const", "inputs": {"value": 10}},
        "b": {"type": "Const", "inputs": {"value": 20}},
        "c": {"type": "Const", "inputs": {"value": 30}},
        "sw": {"type": "Switch", "inputs": {"select": 1, "input_0": link("a"), "input_1": link("b"), "input_2": link("c")}},
        "s": {"type": "Sink", "inputs": {"value": link("sw")}},
    })
    assert engine.run(doc).ui["s"] == {"value": [20]} and set(engine_nodes.calls) == {"b", "s"}
    engine_nodes.calls.clear()
    doc["nodes"]["sw"] = {"type": "SelectFirstAvailable", "inputs": {"input_1": link("a"), "input_2": link("b")}}
    assert engine.run(doc).ui["s"] == {"value": [10]}
    assert "b" not in engine_nodes.calls and "c" not in engine_nodes.calls


def test_a_bypassed_lazy_node_passes_its_first_input_on(engine):
    doc = wf({"a": {"type": "Const", "inputs": {"value": 4}}, "b": {"type": "Const", "inputs": {"value": 5}},
              "if": {"type": "If", "inputs": {"condition": False, "if_true": link("a"), "if_false": link("b")}, "bypass": True},
              "s": {"type": "Sink", "inputs": {"value": link("if")}}})
    assert engine.run(doc).ui["s"] == {"value": [4]}


# -- lists -----------------------------------------------------------------------------------------


def test_a_list_maps_the_nodes_it_feeds_zipping_and_broadcasting(engine):
    doc = wf({
        "seeds": {"type": "SeedList", "inputs": {"start": 5, "count": 3}},
        "one": {"type": "SeedList", "inputs": {"start": 100, "count": 1}},
        "add": {"type": "Add", "inputs": {"a": link("seeds", "seed"), "b": link("one", "seed")}},
        "idx": {"type": "ListIndex", "inputs": {"value": link("add")}},
        "s": {"type": "Sink", "inputs": {"value": link("idx")}},
        "all": {"type": "CollectList", "inputs": {"values": link("add")}},
    })
    result = engine.run(doc)
    assert result.ui["s"] == {"value": [10500, 10601, 10702]}  # one Sink call per element, ui merged
    assert result.ui["all"] == {"values": [[105, 106, 107]]}  # a whole-list input: one call
    assert engine_nodes.calls["add"] == 3 and engine_nodes.calls["s"] == 3


def test_each_list_element_is_memoized_on_its_own(engine):
    doc = wf({
        "seeds": {"type": "SeedList", "inputs": {"start": 5, "count": 3}},
        "inc": {"type": "Increment", "inputs": {"value": link("seeds", "seed")}},
        "s": {"type": "Sink", "inputs": {"value": link("inc")}},
    })
    engine.run(doc)
    engine_nodes.calls.clear()
    doc["nodes"]["seeds"]["inputs"]["count"] = 4  # one more seed: only its element runs
    result = engine.run(doc)
    assert result.ui["s"] == {"value": [6, 7, 8, 9]} and engine_nodes.calls == {"inc": 1, "s": 1}
    assert result.reasons["inc"].endswith("(1 of 4 list elements run)")
    engine_nodes.calls.clear()
    assert engine.run(doc).cached == ["seeds", "inc", "s"] and not engine_nodes.calls
    assert set(engine.explain(Workflow.from_dict(doc)).values()) == {"cache hit"}


def test_lists_of_different_lengths_fail_naming_both(engine):
    doc = wf({
        "x": {"type": "SeedList", "inputs": {"count": 2}},
        "y": {"type": "SeedList", "inputs": {"count": 3}},
        "add": {"type": "Add", "inputs": {"a": link("x", "seed"), "b": link("y", "seed")}},
        "s": {"type": "Sink", "inputs": {"value": link("add")}},
    })
    result = engine.run(doc)
    assert result.status == "failed" and result.error["node"] == "add" and "'a' has 2, 'b' has 3" in result.error["message"]


def test_string_list_sweeps_prompts(engine):
    doc = wf({"p": {"type": "StringList", "inputs": {"text": "a cat\n\n a dog \n"}},
              "s": {"type": "PreviewAny", "inputs": {"value": link("p", "text")}}})
    assert engine.run(doc).ui["s"] == {"text": ["'a cat'", "'a dog'"]}


# -- expansion, async, always_run ------------------------------------------------------------------


def test_a_node_can_expand_into_a_memoized_chain(engine):
    doc = wf({
        "c": {"type": "Const", "inputs": {"value": 1}},
        "r": {"type": "Repeat", "inputs": {"value": link("c"), "node_type": "Increment", "times": 3}},
        "s": {"type": "Sink", "inputs": {"value": link("r")}},
    })
    result = engine.run(doc)
    assert result.ui["s"] == {"value": [4]}
    assert {"r/1", "r/2", "r/3", "r"} <= set(result.executed)
    doc["nodes"]["r"]["inputs"]["times"] = 4  # the first three links of the chain are cache hits
    again = engine.run(doc)
    assert again.ui["s"] == {"value": [5]} and {"r/1", "r/2", "r/3"} <= set(again.cached) and "r/4" in again.executed
    doc["nodes"]["r"]["inputs"]["node_type"] = "NoSuchNode"
    failed = engine.run(doc)
    assert failed.status == "failed" and "unknown node type 'NoSuchNode'" in failed.error["message"]


def test_async_nodes_run_concurrently(engine):
    rendezvous.clear()
    doc = wf({
        "a": {"type": "AsyncMeet", "inputs": {"value": 1, "signal": "a", "wait_for": "b"}},
        "b": {"type": "AsyncMeet", "inputs": {"value": 2, "signal": "b", "wait_for": "a"}},
        "sum": {"type": "Add", "inputs": {"a": link("a"), "b": link("b")}},
        "s": {"type": "Sink", "inputs": {"value": link("sum")}},
    })
    result = engine.run(doc)  # sequential execution would time out waiting in "a"
    assert result.status == "success", result.error
    assert result.ui["s"] == {"value": [3]} and engine.run(doc).executed == []


def test_always_run_nodes_are_never_cache_hits(engine):
    stamps.clear()
    doc = wf({"t": {"type": "Clock", "inputs": {}}, "s": {"type": "PreviewAny", "inputs": {"value": link("t", "text")}},
              "c": {"type": "Const", "inputs": {"value": 1}}, "k": {"type": "Sink", "inputs": {"value": link("c")}}})
    engine.run(doc)
    second = engine.run(doc)
    assert len(stamps) == 2 and "t" in second.executed and {"c", "k"} <= set(second.cached)
    assert second.reasons["t"].startswith("always runs")
    assert engine.explain(Workflow.from_dict(doc))["t"].startswith("always runs")


def test_save_image_names_each_sweep_element_and_batch_image(engine, tmp_path):
    doc = wf({
        "seeds": {"type": "SeedList", "inputs": {"start": 1, "count": 3}},
        "img": {"type": "SeedImage", "inputs": {"seed": link("seeds", "seed"), "batch": 2}},
        "save": {"type": "SaveImage", "inputs": {"images": link("img", "image"), "filename_prefix": "sweep/run"}},
        "tagged": {"type": "SaveImage", "inputs": {"images": link("img", "image"), "filename_prefix": "t-{item}-{batch}"}},
    })
    result = engine.run(doc, output_dir=tmp_path)
    names = [entry["filename"] for entry in result.ui["save"]["images"]]
    assert names == ["run_000_00001.png", "run_000_00002.png", "run_001_00001.png", "run_001_00002.png",
                     "run_002_00001.png", "run_002_00002.png"]
    assert [e["filename"] for e in result.ui["tagged"]["images"]][:3] == ["t-000-00_00001.png", "t-000-01_00001.png",
                                                                         "t-001-00_00001.png"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted(names)
