"""``ditgraph run --fast``: the speed nodes a workflow gets on a given device.

:func:`insert_fast_nodes` rewires a workflow document so every checkpoint loader's MODEL
goes through QuantizeModel (fp8 row-wise, only where fp8 runs: CUDA compute capability 8.9+
with torchao installed) and CompileModel before reaching its consumers. It works on the
document (node type names, not node modules), so fronts can call it before validation.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch

from app.models.quantizers.base import SKIP_IO, fp8_supported

# node types whose output carries a freshly loaded MODEL -> that output's name
MODEL_LOADERS = {"CheckpointLoader": "model"}
FAST_TYPES = ("QuantizeModel", "CompileModel")
FP8_METHOD = "fp8-dynamic-row"
# CompileModel's settings under --fast, spelled out (they are also its defaults). Measured on an
# H200, Flux-dev 1024²: default mode, per-block forwards, no coordinate-descent tuning runs a
# step in 136 ms bf16 / 103 ms fp8 end to end (REFERENCE: compile_repeated_blocks(fullgraph=True)
# 134 ms, torchao fp8 104 ms), compiling in 20 s / 8 s. fullgraph changes no kernel when a
# block has no graph break; max-autotune and fused QKV are measured by bench/gpu_speed.py
# (compile-* variants) before they become the default.
FAST_COMPILE = {"mode": "default", "fullgraph": False, "dynamic": "auto", "backend": "inductor", "tuning": "off",
                "scope": "blocks"}


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def fast_plan(device: torch.device | str) -> list[dict]:
    """The nodes (type and constant inputs) to put after a loader on ``device``, in order."""
    plan = []
    if fp8_supported(device) and torchao_installed():
        plan.append({"type": "QuantizeModel", "inputs": {"method": FP8_METHOD, "skip": SKIP_IO}})
    plan.append({"type": "CompileModel", "inputs": dict(FAST_COMPILE)})
    return plan


def _free_id(nodes: dict, wanted: str) -> str:
    node_id, n = wanted, 1
    while node_id in nodes:
        n += 1
        node_id = f"{wanted}_{n}"
    return node_id


def insert_fast_nodes(workflow_doc: dict[str, Any], device: torch.device | str,
                      plan: list[dict] | None = None) -> dict[str, Any]:
    """A copy of ``workflow_doc`` with the fast chain (``plan``, default :func:`fast_plan`) after
    each checkpoint loader's MODEL. Loaders whose MODEL already feeds a QuantizeModel or
    CompileModel are left as they are."""
    plan = fast_plan(device) if plan is None else plan
    doc = copy.deepcopy(workflow_doc)
    nodes: dict[str, dict] = doc.setdefault("nodes", {})
    for loader_id, loader in list(nodes.items()):
        output = MODEL_LOADERS.get(loader.get("type"))
        if output is None:
            continue
        source = [loader_id, output]
        consumers = [(node_id, name) for node_id, node in nodes.items()
                     for name, value in node.get("inputs", {}).items()
                     if isinstance(value, dict) and list(value.get("from", ())) == source]
        if any(nodes[node_id]["type"] in FAST_TYPES for node_id, _ in consumers):
            continue
        upstream = source
        for step in plan:
            node_id = _free_id(nodes, f"{loader_id}_{step['type']}")
            nodes[node_id] = {"type": step["type"], "inputs": {"model": {"from": upstream}, **step["inputs"]}}
            upstream = [node_id, "model"]
        for node_id, name in consumers:
            nodes[node_id]["inputs"][name] = {"from": list(upstream)}
    return doc
