"""Engine overheads on this CPU: validation+scheduling, per-node overhead, cache-hit re-runs.

    python -m bench.engine            # writes bench/results/engine.json
Targets (issue 2): validate+schedule a 1,000-node DAG < 50 ms; per trivial node < 50 µs;
cache-hit re-run of a 200-node workflow < 20 ms.
"""

from __future__ import annotations

import argparse
import random

from app.core.executor import Engine
from app.core.workflow import Workflow
from app.core.memo import MemoCache
from app.core.registry import default_registry
from bench.common import median_seconds, write_result


def random_dag(count: int, seed: int = 0, sinks: int = 10) -> dict:
    """MathInt nodes, each linked to up to two earlier ones, with PreviewAny sinks."""
    rng = random.Random(seed)
    nodes = {"0": {"type": "PrimitiveInt", "inputs": {"value": seed}}}
    for index in range(1, count - sinks):
        inputs = {"operation": "add", "b": index}
        inputs["a"] = {"from": [str(rng.randrange(index)), "value"]}
        if rng.random() < 0.5:
            inputs["b"] = {"from": [str(rng.randrange(index)), "value"]}
        nodes[str(index)] = {"type": "MathInt", "inputs": inputs}
    for k in range(sinks):
        nodes[f"s{k}"] = {"type": "PreviewAny", "inputs": {"value": {"from": [str(count - sinks - 1 - k), "value"]}}}
    return {"format": "ditgraph/workflow", "version": 1, "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    engine = Engine(default_registry(), MemoCache(max_bytes=1 << 30, max_device_bytes=0), device="cpu")

    big = random_dag(1000)

    def validate_and_schedule():
        workflow = Workflow.from_dict(big)
        assert not [p for p in engine.validate(workflow) if p.severity == "error"]
        engine.plan(workflow)

    validate_ms = median_seconds(validate_and_schedule) * 1e3

    # Per-node overhead: run a fresh 1,000-node workflow (new root seed -> every node misses)
    # and subtract nothing: the node bodies are a few integer operations.
    seeds = iter(range(1, 10_000))

    def uncached_run():
        engine.cache.clear()
        engine.run(random_dag(1000, seed=next(seeds)))

    full_run = median_seconds(uncached_run, repeats=5)
    per_node_us = full_run / 1000 * 1e6

    medium = random_dag(200)
    engine.run(medium)

    def cached_run():
        result = engine.run(medium)
        assert result.executed == []

    cache_hit_ms = median_seconds(cached_run) * 1e3
    results = {
        "validate_schedule_1000_nodes_ms": round(validate_ms, 2),
        "per_node_overhead_us (1000-node uncached run incl. validation)": round(per_node_us, 1),
        "cache_hit_rerun_200_nodes_ms": round(cache_hit_ms, 2),
        "targets": {"validate_schedule_1000_nodes_ms": 50, "per_node_overhead_us": 50, "cache_hit_rerun_200_nodes_ms": 20},
    }
    path = write_result("engine", results, args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
