"""Property tests: nested subgraphs expand to what a reference interpreter computes, lazy
branches never run unneeded nodes, and mapping over a list equals N single runs."""

from __future__ import annotations

import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.executor import Engine
from app.core.registry import node
from app.core.types import INT, ListOf
from tests.core._engines import small_engine
from tests.fixtures import engine_nodes


@node(category="test", outputs={"values": ListOf(INT)})
def IntList(values: str = "") -> list[int]:
    return [int(v) for v in values.split(",") if v]


def fresh_engine() -> Engine:
    return small_engine(sys.modules[__name__])


def link(node_id: str, output: str = "value") -> dict:
    return {"from": [node_id, output]}


def doc(nodes_: dict, subgraphs: dict | None = None) -> dict:
    return {"format": "ditgraph/workflow", "version": 2, "nodes": nodes_, "subgraphs": subgraphs or {}}


# -- nested subgraphs --------------------------------------------------------------------------------


@st.composite
def graph_body(draw, definitions: list[str], inner: bool) -> dict:
    """Const / Add / subgraph-instance nodes, each reading earlier nodes (and @in inside a definition)."""
    nodes_: dict = {}
    for index in range(draw(st.integers(1, 5))):
        sources = [link(n, "out" if nodes_[n]["type"].startswith("subgraph:") else "value") for n in nodes_]
        sources += [link("@in", "x"), link("@in", "y")] if inner else []
        kinds = ["const"] + (["add"] if sources else []) + (["instance"] if definitions else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "const":
            nodes_[f"n{index}"] = {"type": "Const", "inputs": {"value": draw(st.integers(-9, 9))}}
        elif kind == "add":
            inputs = {name: draw(st.sampled_from(sources)) for name in ("a", "b") if draw(st.booleans())}
            nodes_[f"n{index}"] = {"type": "Add", "inputs": inputs}
        else:
            inputs = {"x": draw(st.sampled_from(sources)) if sources and draw(st.booleans()) else draw(st.integers(-9, 9))}
            if draw(st.booleans()):
                inputs["y"] = draw(st.integers(-9, 9))
            nodes_[f"n{index}"] = {"type": f"subgraph:{draw(st.sampled_from(definitions))}", "inputs": inputs}
    return nodes_


@st.composite
def nested_workflows(draw) -> dict:
    subgraphs: dict = {}
    for index in range(draw(st.integers(1, 3))):
        body = draw(graph_body(list(subgraphs), inner=True))
        last = list(body)[-1]
        output = "out" if body[last]["type"].startswith("subgraph:") else "value"
        subgraphs[f"D{index}"] = {"inputs": {"x": {"type": "INT"}, "y": {"type": "INT", "default": 7}},
                                  "outputs": {"out": link(last, output)}, "nodes": body}
    top = draw(graph_body(list(subgraphs), inner=False))
    for node_id in list(top):
        output = "out" if top[node_id]["type"].startswith("subgraph:") else "value"
        top[f"sink_{node_id}"] = {"type": "Sink", "inputs": {"value": link(node_id, output)}}
    return doc(top, subgraphs)


def reference_value(nodes_: dict, node_id: str, env: dict, subgraphs: dict) -> int:
    """Interpret a (possibly nested) graph directly, without expansion."""

    def resolve(value):
        if isinstance(value, dict):
            source, _ = value["from"]
            return env[value["from"][1]] if source == "@in" else reference_value(nodes_, source, env, subgraphs)
        return value

    inst = nodes_[node_id]
    if inst["type"] == "Const":
        return inst["inputs"]["value"]
    if inst["type"] == "Add":
        return sum(resolve(v) for v in inst["inputs"].values())
    definition = subgraphs[inst["type"].removeprefix("subgraph:")]
    inner_env = {"x": resolve(inst["inputs"]["x"]), "y": resolve(inst["inputs"].get("y", 7))}
    source, _ = definition["outputs"]["out"]["from"]
    return reference_value(definition["nodes"], source, inner_env, subgraphs)


@settings(max_examples=40, deadline=None)
@given(nested_workflows())
def test_expanded_subgraphs_compute_what_the_nested_graph_means(workflow):
    result = fresh_engine().run(workflow)
    assert result.status == "success", result.error
    for node_id, inst in workflow["nodes"].items():
        if inst["type"] == "Sink":
            source = inst["inputs"]["value"]["from"][0]
            expected = reference_value(workflow["nodes"], source, {}, workflow["subgraphs"])
            assert result.ui[node_id] == {"value": [expected]}


# -- lazy branches -------------------------------------------------------------------------------------


@st.composite
def lazy_workflows(draw) -> dict:
    nodes_: dict = {}
    for index in range(draw(st.integers(1, 12))):
        earlier = list(nodes_)
        kind = draw(st.sampled_from(["const", "add", "if"] if earlier else ["const"]))
        if kind == "const":
            nodes_[f"n{index}"] = {"type": "Const", "inputs": {"value": draw(st.integers(-9, 9))}}
        elif kind == "add":
            nodes_[f"n{index}"] = {"type": "Add", "inputs": {"a": link(draw(st.sampled_from(earlier)))}}
        else:
            nodes_[f"n{index}"] = {"type": "If", "inputs": {
                "condition": draw(st.booleans()), "if_true": link(draw(st.sampled_from(earlier))),
                "if_false": link(draw(st.sampled_from(earlier)))}}
    nodes_["sink"] = {"type": "Sink", "inputs": {"value": link(list(nodes_)[-1])}}
    return doc(nodes_)


def reference_needed(nodes_: dict, node_id: str, needed: set) -> set:
    if node_id in needed:
        return needed
    needed.add(node_id)
    inputs = nodes_[node_id]["inputs"]
    if nodes_[node_id]["type"] == "If":
        chosen = inputs["if_true" if inputs["condition"] else "if_false"]
        return reference_needed(nodes_, chosen["from"][0], needed)
    for value in inputs.values():
        if isinstance(value, dict):
            reference_needed(nodes_, value["from"][0], needed)
    return needed


@settings(max_examples=60, deadline=None)
@given(lazy_workflows())
def test_lazy_branches_never_run_unneeded_nodes(workflow):
    result = fresh_engine().run(workflow)
    assert result.status == "success", result.error
    expected = reference_needed(workflow["nodes"], "sink", set())
    assert set(result.executed) | set(result.cached) == expected
    assert set(engine_nodes.calls) <= expected


# -- list mapping ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=1, max_size=5), st.integers(-5, 5), st.booleans(), st.integers(1, 3))
def test_mapping_over_a_list_equals_one_run_per_element(values, offset, broadcast_pair, depth):
    other = [offset] if broadcast_pair else [offset + i for i in range(len(values))]

    def workflow(first: dict, second: dict) -> dict:
        nodes_ = {"first": first, "second": second,
                  "add0": {"type": "Add", "inputs": {"a": link("first", "values"), "b": link("second", "values")}}}
        for level in range(1, depth):
            nodes_[f"add{level}"] = {"type": "Add", "inputs": {"a": link(f"add{level - 1}"), "b": link("second", "values")}}
        nodes_["sink"] = {"type": "Sink", "inputs": {"value": link(f"add{depth - 1}")}}
        return doc(nodes_)

    as_list = lambda items: {"type": "IntList", "inputs": {"values": ",".join(map(str, items))}}  # noqa: E731
    mapped = fresh_engine().run(workflow(as_list(values), as_list(other))).ui["sink"]["value"]
    singles = []
    for index, value in enumerate(values):
        pair = other[0] if broadcast_pair else other[index]
        singles += fresh_engine().run(workflow(as_list([value]), as_list([pair]))).ui["sink"]["value"]
    assert mapped == singles
