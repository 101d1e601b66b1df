"""One way for engine tests to build a CPU engine over the core nodes and the counting test nodes."""

from __future__ import annotations

import nodes.core
from app.core.executor import Engine
from app.core.memo import MemoCache
from app.core.registry import Registry
from tests.fixtures import engine_nodes


def small_engine(*modules, cache_policy=None) -> Engine:
    """nodes.core + tests.fixtures.engine_nodes (+ ``modules``), a 64 MiB CPU memo cache; the
    call counters are reset."""
    registry = Registry()
    for module in (nodes.core, engine_nodes, *modules):
        registry.add_module(module)
    engine_nodes.calls.clear()
    engine_nodes.order.clear()
    return Engine(registry, MemoCache(max_bytes=1 << 26, max_device_bytes=0), device="cpu", cache_policy=cache_policy)
