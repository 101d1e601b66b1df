"""Memo cache policies: byte LRU, keep-N workflows, RAM pressure, none; the spec parser."""

from __future__ import annotations

import pytest

from app.core.cache_policies import CACHE_POLICIES, KeepWorkflows, RamPressure, parse_cache_policy
from app.core.executor import Engine
from tests.core._engines import small_engine


def workflow(name: str, value: int) -> dict:
    return {"format": "ditgraph/workflow", "version": 2, "meta": {"name": name}, "nodes": {
        "c": {"type": "Const", "inputs": {"value": value}},
        "s": {"type": "Sink", "inputs": {"value": {"from": ["c", "value"]}}}}}


def engine(policy) -> Engine:
    return small_engine(cache_policy=policy)


def test_parse_cache_policy_specs():
    assert set(CACHE_POLICIES) == {"lru", "workflows", "ram", "none"}
    assert parse_cache_policy("lru:1.5G").max_bytes == 3 << 29
    assert parse_cache_policy("workflows:2").count == 2 and parse_cache_policy("ram:0.3").min_free == 0.3
    assert parse_cache_policy(None).describe() == "lru" and parse_cache_policy("none").describe() == "none"
    for bad in ("lru:lots", "workflows:0", "ram:2", "fifo", "none:3"):
        with pytest.raises(ValueError, match="cache policy"):
            parse_cache_policy(bad)


def test_keep_n_workflows_drops_the_oldest_workflow_only():
    eng = engine("workflows:2")
    for name, value in (("a", 1), ("b", 2), ("a", 1), ("c", 3)):  # "a" re-used: "b" is the oldest
        eng.run(workflow(name, value))
    assert eng.run(workflow("a", 1)).executed == []
    assert eng.run(workflow("b", 2)).executed == ["c", "s"]
    assert isinstance(eng.cache.policy, KeepWorkflows)


def test_ram_pressure_evicts_least_recent_first():
    free = [0.5]
    eng = engine(RamPressure(min_free=0.2, available=lambda: free[0]))
    eng.run(workflow("a", 1))
    eng.run(workflow("b", 2))
    assert len(eng.cache) == 4
    free[0] = 0.1  # pressure: the next put evicts until only the new entry is left
    eng.run(workflow("c", 3))
    assert len(eng.cache) == 1 and eng.cache.stats["evictions"] >= 4
    assert eng.run(workflow("a", 1)).executed == ["c", "s"]


def test_no_cache_keeps_nothing_between_runs():
    eng = engine("none")
    eng.run(workflow("a", 1))
    assert len(eng.cache) == 0 and eng.run(workflow("a", 1)).executed == ["c", "s"]


def test_lru_default_keeps_both_workflows():
    eng = engine(None)
    eng.run(workflow("a", 1))
    eng.run(workflow("b", 2))
    assert eng.run(workflow("a", 1)).executed == [] and eng.cache.summary()["policy"] == "lru"
