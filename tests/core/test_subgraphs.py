"""Subgraphs (workflow format v2): expansion, promoted widgets, nesting, recursion, blueprints."""

from __future__ import annotations

import pytest

from app.core import paths
from app.core.executor import Engine
from app.core.subgraphs import list_blueprints, load_blueprint, save_blueprint
from app.core.validation import validate
from app.core.workflow import Workflow, WorkflowError
from tests.core._engines import small_engine


def link(node_id: str, output: str = "value") -> dict:
    return {"from": [node_id, output]}


# AddBias(x, bias=10) = x + bias; Twice(x) = AddBias(AddBias(x)) with bias promoted
ADD_BIAS = {
    "inputs": {"x": {"type": "INT"}, "bias": {"type": "INT", "default": 10}},
    "outputs": {"y": link("add")},
    "nodes": {"add": {"type": "Add", "inputs": {"a": link("@in", "x"), "b": link("@in", "bias")}}},
}
TWICE = {
    "inputs": {"x": {"type": "INT"}, "bias": {"type": "INT", "default": 1}},
    "outputs": {"y": link("second", "y")},
    "nodes": {
        "first": {"type": "subgraph:AddBias", "inputs": {"x": link("@in", "x"), "bias": link("@in", "bias")}},
        "second": {"type": "subgraph:AddBias", "inputs": {"x": link("first", "y"), "bias": link("@in", "bias")}},
    },
}


def doc(nodes: dict, **subgraphs) -> dict:
    return {"format": "ditgraph/workflow", "version": 2, "nodes": nodes,
            "subgraphs": subgraphs or {"AddBias": ADD_BIAS, "Twice": TWICE}}


@pytest.fixture
def engine() -> Engine:
    return small_engine()


def test_instance_runs_its_inner_nodes_under_namespaced_ids(engine):
    workflow = doc({
        "c": {"type": "Const", "inputs": {"value": 5}},
        "up": {"type": "subgraph:AddBias", "inputs": {"x": link("c")}},  # bias: the default 10
        "s": {"type": "Sink", "inputs": {"value": link("up", "y")}},
    })
    events = []
    result = engine.run(workflow, on_event=events.append)
    assert result.ui["s"] == {"value": [15]}
    assert sorted(result.executed) == ["c", "s", "up/add"]
    assert {e["node"] for e in events if e["type"] == "node_started"} == {"c", "s", "up/add"}
    workflow["nodes"]["up"]["inputs"]["bias"] = 1  # a promoted widget value
    changed = Workflow.from_dict(workflow)
    assert engine.explain(changed)["up/add"] == "input 'b' changed 10 -> 1"
    assert engine.run(workflow).ui["s"] == {"value": [6]}


def test_nested_instances_and_identical_instances_share_memoized_work(engine):
    workflow = doc({
        "c": {"type": "Const", "inputs": {"value": 1}},
        "t1": {"type": "subgraph:Twice", "inputs": {"x": link("c"), "bias": 3}},
        "t2": {"type": "subgraph:Twice", "inputs": {"x": link("c"), "bias": 3}},
        "s1": {"type": "Sink", "inputs": {"value": link("t1", "y")}},
        "s2": {"type": "Sink", "inputs": {"value": link("t2", "y")}},
    })
    result = engine.run(workflow)
    assert result.ui["s1"] == result.ui["s2"] == {"value": [7]}
    assert "t1/first/add" in result.executed and "t1/second/add" in result.executed
    assert {"t2/first/add", "t2/second/add"} <= set(result.cached)  # same content key as t1's nodes
    assert engine.run(workflow, targets=["t1"]).outputs["t1/second/add"] == (7,)


def test_problems_inside_an_instance_name_the_inner_node(engine):
    workflow = doc({"up": {"type": "subgraph:AddBias", "inputs": {"x": 1, "bias": "ten", "colour": 1}},
                    "s": {"type": "Sink", "inputs": {"value": link("up", "nope")}}})
    problems = {(p.node, p.input, p.kind) for p in validate(Workflow.from_dict(workflow), engine.registry)}
    assert ("up", "colour", "unknown_input") in problems and ("s", None, "bad_link") in problems
    del workflow["nodes"]["up"]["inputs"]["colour"]
    workflow["nodes"]["s"]["inputs"]["value"] = link("up", "y")
    problems = [(p.node, p.input, p.kind) for p in validate(Workflow.from_dict(workflow), engine.registry)]
    assert problems == [("up/add", "b", "bad_value")]


def test_a_bypassed_instance_is_refused_by_name(engine):
    workflow = doc({"up": {"type": "subgraph:AddBias", "inputs": {"x": 1}, "bypass": True}})
    assert [(p.node, p.kind) for p in validate(Workflow.from_dict(workflow), engine.registry)] == [("up", "bypass")]


def test_recursion_is_refused_with_the_chain_named(engine):
    loop_a = {"inputs": {}, "outputs": {}, "nodes": {"b": {"type": "subgraph:B", "inputs": {}}}}
    loop_b = {"inputs": {}, "outputs": {}, "nodes": {"a": {"type": "subgraph:A", "inputs": {}}}}
    workflow = doc({"x": {"type": "subgraph:A", "inputs": {}}}, A=loop_a, B=loop_b)
    with pytest.raises(WorkflowError, match=r"subgraph recursion: A -> B -> A") as raised:
        engine.run(workflow)
    assert raised.value.problems[0].node == "x/b/a"


def test_blueprints_are_saved_and_used_by_name(engine, tmp_path):
    paths.configure(subgraphs=tmp_path)
    try:
        save_blueprint(Workflow.from_dict(doc({})).subgraphs["Twice"], {"AddBias": Workflow.from_dict(doc({})).subgraphs["AddBias"]})
        assert list_blueprints() == ["Twice"] and "AddBias" in load_blueprint("Twice").subgraphs
        workflow = {"format": "ditgraph/workflow", "version": 2, "nodes": {
            "t": {"type": "subgraph:Twice", "inputs": {"x": 2}},
            "s": {"type": "Sink", "inputs": {"value": link("t", "y")}}}}
        assert engine.run(workflow).ui["s"] == {"value": [4]}  # not embedded: taken from the library
        with pytest.raises(paths.PathRefused, match="outside"):
            load_blueprint("../escape")
    finally:
        paths._overrides.pop("subgraphs", None)


def test_version_1_documents_migrate_and_round_trip():
    old = {"format": "ditgraph/workflow", "version": 1, "nodes": {"1": {"type": "Const", "inputs": {"value": 3}}}}
    assert Workflow.from_dict(old).to_dict()["version"] == 2
    workflow = Workflow.from_dict(doc({"u": {"type": "subgraph:AddBias", "inputs": {"x": 1}}}))
    assert Workflow.from_dict(workflow.to_dict()).to_dict() == workflow.to_dict()
    assert workflow.to_dict()["subgraphs"]["AddBias"]["nodes"]["add"]["inputs"]["a"] == link("@in", "x")
