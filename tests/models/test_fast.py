"""insert_fast_nodes: the --fast rewiring of a workflow document."""

from __future__ import annotations

import json
from pathlib import Path

from app.core import workflow
from app.core.registry import default_registry
from app.models import fast

GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "shapes-cache.json"


def links_to(doc: dict, source: list) -> list[tuple[str, str]]:
    return [(node_id, name) for node_id, node in doc["nodes"].items()
            for name, value in node["inputs"].items() if isinstance(value, dict) and value.get("from") == source]


def test_cpu_gets_compile_only_and_every_consumer_is_rewired():
    doc = json.loads(GRAPH.read_text())
    consumers = links_to(doc, ["1", "model"])
    assert consumers
    fast_doc = fast.insert_fast_nodes(doc, "cpu")
    assert doc == json.loads(GRAPH.read_text())  # the input document is not changed
    added = {k: v for k, v in fast_doc["nodes"].items() if k not in doc["nodes"]}
    assert [v["type"] for v in added.values()] == ["CompileModel"]
    (compile_id,) = added
    assert links_to(fast_doc, ["1", "model"]) == [(compile_id, "model")]
    assert sorted(links_to(fast_doc, [compile_id, "model"])) == sorted(consumers)
    problems = workflow.errors(workflow.validate(workflow.Workflow.from_dict(fast_doc), default_registry()))
    assert not problems, problems
    assert fast.insert_fast_nodes(fast_doc, "cpu") == fast_doc  # applying it twice adds nothing


def test_fp8_devices_get_quantize_then_compile(monkeypatch):
    monkeypatch.setattr(fast, "fp8_supported", lambda device: True)
    monkeypatch.setattr(fast, "torchao_installed", lambda: True)
    doc = json.loads(GRAPH.read_text())
    fast_doc = fast.insert_fast_nodes(doc, "cuda")
    (quantize_id,) = [k for k, v in fast_doc["nodes"].items() if v["type"] == "QuantizeModel"]
    (compile_id,) = [k for k, v in fast_doc["nodes"].items() if v["type"] == "CompileModel"]
    assert fast_doc["nodes"][quantize_id]["inputs"]["model"] == {"from": ["1", "model"]}
    assert fast_doc["nodes"][quantize_id]["inputs"]["method"] == "fp8-dynamic-row"
    assert fast_doc["nodes"][compile_id]["inputs"]["model"] == {"from": [quantize_id, "model"]}
    problems = workflow.errors(workflow.validate(workflow.Workflow.from_dict(fast_doc), default_registry()))
    assert not problems, problems


def test_fast_compile_settings_are_explicit_valid_and_compile_models_defaults():
    spec = default_registry().get("CompileModel")
    for name, value in fast.FAST_COMPILE.items():
        socket = spec.inputs[name]
        assert socket.default == value, f"--fast and CompileModel disagree on {name}"
        choices = socket.spec.choice_list()
        assert not choices or value in choices
    (step,) = [s for s in fast.fast_plan("cpu") if s["type"] == "CompileModel"]
    assert step["inputs"] == fast.FAST_COMPILE


def test_compile_tuning_goes_to_inductor_options_with_the_mode_spelled_out():
    from app.models.compile import CompileOptions

    assert CompileOptions(tuning="inherit").kwargs()["mode"] == "default"
    options = CompileOptions(mode="max-autotune-no-cudagraphs", tuning="off").kwargs()
    assert "mode" not in options  # torch.compile takes mode or options, not both
    assert options["options"]["max_autotune"] is True and options["options"]["coordinate_descent_tuning"] is False
    assert "options" not in CompileOptions(backend="eager", tuning="coordinate-descent").kwargs()


def test_compile_options_change_the_memo_key():
    """A CompileModel whose scope or mode changes is a new node output (a new compiled view)."""
    from app.core.keys import engine_salt, node_key
    from app.core.workflow import Connection

    spec = default_registry().get("CompileModel")
    model = {"model": Connection("1", "model")}

    def key(**inputs):
        return node_key(spec, {**model, **fast.FAST_COMPILE, **inputs}, {"1": "loader"}, engine_salt("cpu")).key

    base = key()
    assert key() == base
    assert len({base, key(scope="model"), key(mode="reduce-overhead"), key(scope="model", mode="reduce-overhead")}) == 4
