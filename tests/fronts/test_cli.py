"""The ``ditgraph`` command, in process (fast) and once as a real console process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.fronts.cli import main
from tests.fixtures._server_helpers import REPO, TEST_NODES, count_workflow, workflow


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own folders per test (the folder overrides the CLI sets are undone by tests/conftest.py)."""
    monkeypatch.setenv("DITGRAPH_PLUGINS", TEST_NODES)
    monkeypatch.setenv("DITGRAPH_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("DITGRAPH_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("DITGRAPH_INPUTS", str(tmp_path / "in"))


@pytest.fixture
def wf(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(count_workflow(steps=3)))
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_prints_outputs(capsys, wf, tmp_path):
    code, out, err = run(capsys, "run", wf, "--device", "cpu")
    assert code == 0, err
    assert "ok:" in out and "node 4: 3" in out
    assert (tmp_path / "out" / "text_00001.txt").read_text() == "3"
    code, out, _ = run(capsys, "run", wf, "--output-dir", str(tmp_path / "elsewhere"), "--set", "1.steps=5")
    assert code == 0 and (tmp_path / "elsewhere" / "text_00001.txt").read_text() == "5"


def test_set_parses_by_declared_type(capsys, tmp_path):
    path = tmp_path / "types.json"
    path.write_text(json.dumps(workflow({
        "1": {"type": "PrimitiveFloat", "inputs": {"value": 0.0}},
        "2": {"type": "PrimitiveBoolean", "inputs": {"value": False}},
        "3": {"type": "PrimitiveString", "inputs": {"value": ""}},
        "4": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}},
        "5": {"type": "PreviewAny", "inputs": {"value": {"from": ["2", "value"]}}},
        "6": {"type": "PreviewAny", "inputs": {"value": {"from": ["3", "value"]}}},
    })))
    code, out, err = run(capsys, "run", str(path), "--set", "1.value=2.5", "--set", "2.value=yes", "--set", "3.value=12")
    assert code == 0, err
    assert "node 4: 2.5" in out and "node 5: True" in out and "node 6: '12'" in out


@pytest.mark.parametrize("assignment, message", [
    ("1.steps=abc", "is an integer"),
    ("1.delay=fast", "is a number"),
    ("9.steps=1", "no node '9'"),
    ("1.stepz=1", "has no input 'stepz'"),
    ("steps=1", "expected NODE.INPUT"),
    ("1.steps", "expected NODE.INPUT=VALUE"),
    ("1.steps=-4", "below the minimum"),
])
def test_bad_set_exits_2(capsys, wf, assignment, message):
    code, out, err = run(capsys, "run", wf, "--set", assignment)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("error: ")


def test_bad_files_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "run", str(tmp_path / "missing.json"))
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "run", str(bad))
    assert code == 2 and "not valid JSON" in err
    comfy = tmp_path / "comfy.json"
    comfy.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    code, _, err = run(capsys, "run", str(comfy))
    assert code == 2 and "import-comfy" in err
    code, _, err = run(capsys, "run")
    assert code == 2 and "WORKFLOW" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "run", str(bad), "--device", "tpu9")
    assert code == 2


def test_run_failure_exits_1(capsys, tmp_path):
    path = tmp_path / "fail.json"
    path.write_text(json.dumps(workflow({"1": {"type": "Fail", "inputs": {"message": "kaputt"}},
                                         "2": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}}})))
    code, _, err = run(capsys, "run", str(path))
    assert code == 1 and "node 1 (Fail) failed" in err and "kaputt" in err and "Traceback" not in err


def test_batch_of_three(capsys, wf, tmp_path):
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"1.steps": 1}\n\n# a comment\n{"1.steps": "2", "1.start": 10}\n{"3.prefix": "other"}\n')
    code, out, err = run(capsys, "run", wf, "--batch", str(batch), "--output-dir", str(tmp_path / "b"))
    assert code == 0, err
    assert (tmp_path / "b" / "batch-0001" / "text_00001.txt").read_text() == "1"
    assert (tmp_path / "b" / "batch-0004" / "text_00001.txt").read_text() == "12"
    assert (tmp_path / "b" / "batch-0005" / "other_00001.txt").read_text() == "3"
    assert out.count("ok:") == 3


def test_batch_problems_are_all_reported_before_running(capsys, wf, tmp_path):
    batch = tmp_path / "bad.jsonl"
    batch.write_text('{"1.steps": 1}\n[1, 2]\n{"9.x": 1}\n{"1.steps": "many"}\nnot json\n')
    code, _, err = run(capsys, "run", wf, "--batch", str(batch), "--output-dir", str(tmp_path / "b"))
    assert code == 2
    for line in (":2:", ":5:"):
        assert line in err
    assert not (tmp_path / "b").exists()
    batch.write_text('{"9.x": 1}\n{"1.steps": "many"}\n')
    code, _, err = run(capsys, "run", wf, "--batch", str(batch))
    assert code == 2 and "no node '9'" in err and "'many' is not one" in err


def test_json_events(capsys, wf, tmp_path):
    code, out, _ = run(capsys, "run", wf, "--json", "--set", "1.steps=2")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and types[-1] == "result" and "progress" in types
    assert events[-1]["status"] == "success" and events[-1]["files"]
    progress = next(e for e in events if e["type"] == "progress")
    assert progress["preview"].startswith("data:image/png;base64,")


def test_validate(capsys, wf, tmp_path):
    code, out, _ = run(capsys, "validate", wf)
    assert code == 0 and "is valid" in out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(workflow({"1": {"type": "SlowCount", "inputs": {"steps": "x", "delay": 99}},
                                           "2": {"type": "Nope"}})))
    code, _, err = run(capsys, "validate", str(broken))
    assert code == 2
    assert "input 'steps'" in err and "input 'delay'" in err and "'Nope'" in err
    code, out, _ = run(capsys, "validate", str(broken), "--json")
    assert code == 2 and len(json.loads(out)["problems"]) >= 3


def test_nodes_models_version_explain(capsys, wf, tmp_path):
    code, out, _ = run(capsys, "nodes", "--json")
    assert code == 0 and "SlowCount" in {n["type"] for n in json.loads(out)}
    code, out, _ = run(capsys, "nodes", "primitive")
    assert code == 0 and "PrimitiveInt" in out and "SlowCount" not in out
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "style.safetensors").write_bytes(b"")
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and json.loads(out)["kinds"]["loras"] == ["style.safetensors"]
    code, out, _ = run(capsys, "models")
    assert "style.safetensors" in out
    code, out, _ = run(capsys, "version", "--json")
    assert code == 0 and json.loads(out)["ditgraph"]
    code, out, _ = run(capsys, "explain", wf)
    assert code == 0 and "node 1 (SlowCount)" in out
    code, out, _ = run(capsys, "explain", wf, "--json")
    assert json.loads(out)["order"] == ["1", "2", "3", "4"]
    code, _, err = run(capsys, "explain", wf, "--server", "http://127.0.0.1:1")
    assert code == 2 and "cannot reach" in err


def test_plugin_errors_exit_2(capsys, wf, monkeypatch):
    monkeypatch.setenv("DITGRAPH_PLUGINS", "no_such_module_xyz")
    code, _, err = run(capsys, "run", wf)
    assert code == 2 and "no_such_module_xyz" in err


def test_console_process_and_help(tmp_path, wf):
    """The real entry point: exit codes come out of the process; --help documents them."""
    env = {"PYTHONPATH": str(REPO), "DITGRAPH_PLUGINS": TEST_NODES, "DITGRAPH_OUTPUTS": str(tmp_path / "o"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.fronts.cli", "run", wf, "--set", "1.steps=oops"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "oops" in done.stderr
    helped = subprocess.run([sys.executable, "-m", "app.fronts.cli", "run", "--help"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and "130" in helped.stdout and "--batch" in helped.stdout


def test_ctrl_c_cancels_with_130(tmp_path, wf):
    import signal

    env = {"PYTHONPATH": str(REPO), "DITGRAPH_PLUGINS": TEST_NODES, "DITGRAPH_OUTPUTS": str(tmp_path / "o"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "app.fronts.cli", "run", wf, "--json", "--set", "1.steps=1000",
                                "--set", "1.delay=0.02"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if '"progress"' in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert json.loads(out.splitlines()[-1])["status"] == "cancelled" and "Traceback" not in err


def test_cuda_device_without_cuda_exits_2(capsys, wf):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "run", wf, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_workflow_by_name_and_stdin(capsys, tmp_path, monkeypatch):
    saved = tmp_path / "workflows"
    saved.mkdir()
    (saved / "counted.json").write_text(json.dumps(count_workflow(steps=2)))
    monkeypatch.setenv("DITGRAPH_WORKFLOWS", str(saved))
    code, out, err = run(capsys, "run", "counted")
    assert code == 0 and "node 4: 2" in out, err
    code, _, err = run(capsys, "validate", "no-such-workflow")
    assert code == 2 and "does not exist" in err
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(count_workflow(steps=6))))
    code, out, _ = run(capsys, "run", "-")
    assert code == 0 and "node 4: 6" in out


SHAPES_GRAPH = str(REPO / "graphs" / "shapes-txt2img.json")


def test_explain_shows_the_loaders_vram_plan_for_each_budget(capsys):
    """Planned from shapes-dit's configs for CUDA (bf16) on any machine: budgets around its
    ~0.3 GiB need pick each mode; too small a budget is said, not raised."""
    def modes(*flags):
        code, out, err = run(capsys, "explain", SHAPES_GRAPH, "--device", "cuda", *flags, "--json")
        assert code == 0, err
        plan = json.loads(out)["estimates"]["1"]
        return {m["name"]: (m["mode"], m["resident_blocks"]) for m in plan["models"]}

    assert modes("--vram", "1GB", "--reserve-vram", "100MB") == {
        "transformer": ("resident", 0), "minilm": ("resident", 0), "vae": ("resident", 0)}
    assert modes("--vram", "323MB") == {"transformer": ("resident", 0), "minilm": ("stream", 1), "vae": ("model", 0)}
    assert modes("--vram", "320MB")["minilm"] == ("blocks", 0)
    assert modes("--vram", "1GB", "--set", "1.offload=blocks")["transformer"] == ("blocks", 0)

    code, out, err = run(capsys, "explain", SHAPES_GRAPH, "--device", "cuda", "--vram", "323MB")
    assert code == 0, err
    assert "node 1 (CheckpointLoader)" in out
    assert "VRAM budget 323.0 MiB, reserve 0.0 MiB: 323.0 MiB for models" in out
    assert "minilm: stream blocks, 1/6 resident: " in out and "vae: offload between uses: " in out
    code, out, _ = run(capsys, "explain", SHAPES_GRAPH, "--device", "cuda", "--vram", "100MB")
    assert code == 0 and "cannot estimate: transformer needs at least" in out and "raise --vram" in out
    code, out, _ = run(capsys, "explain", SHAPES_GRAPH, "--device", "cpu")
    assert "no VRAM budget" in out and "transformer: resident: " in out
    code, _, err = run(capsys, "explain", SHAPES_GRAPH, "--vram", "1GB", "--server", "http://127.0.0.1:1")
    assert code == 2 and "--server" in err


def test_serve_with_ray_gives_the_workers_the_engine_options(capsys, monkeypatch, tmp_path):
    """`serve --ray auto --vram 12GB`: the options that build a local engine travel to the workers."""
    import app.fronts.http.app as http_app
    from bench.harness import free_port

    seen = {}
    monkeypatch.setattr(http_app, "serve", lambda *args, **kwargs: seen.update(kwargs))
    code, _, err = run(capsys, "serve", "--port", str(free_port()), "--db", str(tmp_path / "q.sqlite3"),
                       "--workflows-dir", str(tmp_path / "wf"), "--ray", "auto", "--vram", "12GB",
                       "--reserve-vram", "1GB", "--cache", "lru:8G")
    assert code == 0, err
    options = {"memory": {"vram": 12 << 30, "reserve": 1 << 30}, "cache_policy": "lru:8G"}
    assert seen["settings"].ray_engine == options
    assert seen["engine"].device.type == "cpu" and seen["engine"].memory["vram"] == 12 << 30
