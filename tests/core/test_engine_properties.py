"""Property tests on random DAGs: dependency order and exactly-once execution."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import nodes.core
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.core.registry import Registry
from tests.fixtures import engine_nodes


@st.composite
def random_dags(draw):
    """Nodes 0..n-1; each Add node links to up to two earlier nodes; some nodes are sinks."""
    count = draw(st.integers(min_value=1, max_value=25))
    nodes = {}
    for index in range(count):
        node_id = f"n{index}"
        if index == 0 or draw(st.booleans()):
            nodes[node_id] = {"type": "Const", "inputs": {"value": draw(st.integers(-5, 5))}}
            continue
        inputs = {}
        for name in ("a", "b"):
            if draw(st.booleans()):
                inputs[name] = {"from": [f"n{draw(st.integers(0, index - 1))}", "value"]}
        nodes[node_id] = {"type": "Add", "inputs": inputs}
    sinks = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=4, unique=True))
    for k, target in enumerate(sinks):
        nodes[f"sink{k}"] = {"type": "Sink", "inputs": {"value": {"from": [f"n{target}", "value"]}}}
    # shuffle the declaration order: the executor must not rely on it
    order = draw(st.permutations(list(nodes)))
    return {"format": "ditgraph/workflow", "version": 1, "nodes": {k: nodes[k] for k in order}}


def fresh_engine() -> Engine:
    registry = Registry()
    registry.add_module(nodes.core)
    registry.add_module(engine_nodes)
    return Engine(registry, MemoCache(max_bytes=1 << 26, max_device_bytes=0), device="cpu")


def expected_value(doc, node_id, memo):
    if node_id not in memo:
        node = doc["nodes"][node_id]
        if node["type"] == "Const":
            memo[node_id] = node["inputs"]["value"]
        else:
            memo[node_id] = sum(expected_value(doc, v["from"][0], memo) for v in node["inputs"].values())
    return memo[node_id]


@settings(max_examples=60, deadline=None)
@given(random_dags())
def test_order_respects_dependencies_and_each_node_runs_once(doc):
    engine = fresh_engine()
    engine_nodes.calls.clear()
    engine_nodes.order.clear()
    events = []
    result = engine.run(doc, on_event=events.append)
    assert result.status == "success"
    # identical nodes share a content key, so a later twin is a hit within the same run
    visited = [e["node"] for e in events if e["type"] in ("node_started", "node_cached")]
    assert len(visited) == len(set(visited)) == len(result.executed) + len(result.cached)
    position = {node_id: i for i, node_id in enumerate(visited)}
    for node_id, node in doc["nodes"].items():
        for value in node["inputs"].values():
            if isinstance(value, dict) and node_id in position:
                assert position[value["from"][0]] < position[node_id]
    assert all(count == 1 for count in engine_nodes.calls.values())
    assert set(engine_nodes.calls) == set(result.executed)
    memo = {}
    for node_id, node in doc["nodes"].items():
        if node["type"] == "Sink":
            assert result.ui[node_id] == {"value": [expected_value(doc, node["inputs"]["value"]["from"][0], memo)]}
    # a second run computes nothing
    engine_nodes.calls.clear()
    assert engine.run(doc).executed == [] and not engine_nodes.calls
