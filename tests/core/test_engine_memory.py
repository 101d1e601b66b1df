"""The engine's per-workflow memory stays bounded however many workflow names it sees."""

from __future__ import annotations

import nodes.core
import tests.fixtures._api_nodes
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.core.registry import Registry
from app.core.workflow import Workflow
from tests.fixtures._server_helpers import count_workflow


def test_last_parts_is_a_bounded_lru(tmp_path):
    registry = Registry()
    registry.add_module(nodes.core)
    registry.add_module(tests.fixtures._api_nodes)
    engine = Engine(registry, MemoCache(max_device_bytes=0), device="cpu", output_dir=tmp_path)
    engine.last_parts_limit = 12
    for i in range(20):
        document = count_workflow(steps=1, start=i)
        document["meta"]["name"] = f"workflow-{i}"
        assert engine.run(Workflow.from_dict(document)).status == "success"
    assert len(engine._last_parts) == 12  # four nodes each: the three newest workflows are remembered
    assert {scope for scope, _node in engine._last_parts} == {"workflow-17", "workflow-18", "workflow-19"}
