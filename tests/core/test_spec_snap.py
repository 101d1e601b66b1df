"""A declared ``Spec(step=..., snap=True)`` is checked by validation and shown in the catalogue."""

from __future__ import annotations

import nodes.latent
from app.core.registry import Registry
from app.core.workflow import Workflow, validate


def _problems(width: int) -> list:
    registry = Registry()
    registry.add_module(nodes.latent)
    doc = {"format": "ditgraph/workflow", "version": 1, "layout": {}, "meta": {},
           "nodes": {"4": {"type": "EmptyLatent", "inputs": {"width": width, "height": 128, "batch_size": 1}}}}
    return [p for p in validate(Workflow.from_dict(doc), registry) if p.input == "width"], registry


def test_empty_latent_width_must_be_a_multiple_of_16():
    problems, registry = _problems(100)
    assert [p.message for p in problems] == ["value 100 is not a multiple of 16"]
    assert _problems(112)[0] == []
    entry = next(e for e in registry.catalogue() if e["type"] == "EmptyLatent")
    width = next(i for i in entry["inputs"] if i["name"] == "width")
    assert width["snap"] is True and width["step"] == 16
