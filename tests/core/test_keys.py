"""Public key and order API: node_key / Engine.node_keys (used by Ray), Workflow.execution_order."""

from __future__ import annotations

from app.core.executor import Engine
from app.core.keys import engine_salt, node_key
from app.core.workflow import Connection, Workflow
from tests.core._engines import small_engine


def engine() -> Engine:
    return small_engine()


def doc(b: int = 2) -> dict:
    link = lambda n: {"from": [n, "value"]}  # noqa: E731
    return {"format": "ditgraph/workflow", "version": 1, "nodes": {
        "sink": {"type": "Sink", "inputs": {"value": link("sum")}},
        "sum": {"type": "Add", "inputs": {"a": link("a"), "b": link("b")}},
        "b": {"type": "Const", "inputs": {"value": b}},
        "a": {"type": "Const", "inputs": {"value": 1}},
    }}


def test_node_keys_are_the_keys_a_run_memoizes():
    eng = engine()
    keys = eng.node_keys(Workflow.from_dict(doc()))
    assert list(keys) == ["b", "a", "sum", "sink"]  # producers first, ties in declaration order
    eng.run(doc())
    assert all(key in eng.cache for key in keys.values())
    changed = eng.node_keys(Workflow.from_dict(doc(b=3)))
    assert [n for n in keys if keys[n] != changed[n]] == ["b", "sum", "sink"]


def test_node_key_is_a_pure_function_of_its_parts():
    const = engine().registry.get("Add")
    first = node_key(const, {"a": Connection("x", "value"), "b": 2}, {"x": "k1"}, engine_salt("cpu"))
    again = node_key(const, {"a": Connection("y", "value"), "b": 2}, {"y": "k1"}, engine_salt("cpu"))
    assert first.key == again.key  # the upstream node's id does not matter, only its key
    assert node_key(const, {"a": Connection("x", "value"), "b": 2}, {"x": "k2"}, engine_salt("cpu")).key != first.key
    assert node_key(const, {"a": Connection("x", "value"), "b": 2}, {"x": "k1"}, engine_salt("cuda")).key != first.key
    assert first.constants == {"b": 2} and first.parts["links"] == {"a": "k1:value"}


def test_execution_order_covers_only_what_targets_need():
    workflow = Workflow.from_dict(doc())
    assert workflow.execution_order(["sum"]) == ["b", "a", "sum"]
    assert workflow.cycles() == []


def test_a_long_chain_needs_no_recursion():
    count = 3000  # recursive validators and key builders fail near 1,000 (Python's recursion limit)
    nodes_ = {"0": {"type": "Const", "inputs": {"value": 0}}}
    for index in range(1, count):
        nodes_[str(index)] = {"type": "Increment", "inputs": {"value": {"from": [str(index - 1), "value"]}}}
    nodes_["sink"] = {"type": "Sink", "inputs": {"value": {"from": [str(count - 1), "value"]}}}
    result = engine().run({"format": "ditgraph/workflow", "version": 2, "nodes": nodes_})
    assert result.ui["sink"] == {"value": [count - 1]}
