"""Hostile input gets a clear 4xx (HTTP) or exit 2 (CLI), never a 500, a traceback or a huge allocation."""

from __future__ import annotations

import json
import os
import re
import zlib

import httpx
import pytest

from app.fronts.cli import main
from tests.fixtures._server_helpers import TEST_NODES, count_workflow, shared_server, wait_idle, workflow
from tests.fixtures.hostile import nested, png, png_chunk


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def test_compressed_text_bomb_is_refused_with_413(client):
    """Each zTXt chunk under the old per-chunk cap, together far over any sane total."""
    bomb = zlib.compress(b" " * (8 << 20), 9)
    chunks = tuple(png_chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + bomb) for i in range(4))
    response = client.post("/api/workflow-from-png", files={"image": ("bomb.png", png(chunks=chunks), "image/png")})
    assert response.status_code == 413, response.text
    assert "inflates past" in response.json()["error"]


def test_decompression_bomb_upload_is_refused_before_decoding(client):
    data = png(16000, 11000)
    assert len(data) < 2048
    response = client.post("/api/uploads", files={"image": ("huge.png", data, "image/png")})
    assert response.status_code == 413, response.text
    assert "16000x11000" in response.json()["error"]


@pytest.mark.parametrize("name", [".", "./", "..", "a/.", "x" * 300 + ".png", "é" * 200 + ".png"])
def test_hostile_file_names_are_400_not_500(client, name):
    document = workflow({"1": {"type": "LoadImage", "inputs": {"image": name}},
                         "2": {"type": "PreviewImage", "inputs": {"images": {"from": ["1", "image"]}}}})
    response = client.post("/api/runs", json={"workflow": document})
    assert response.status_code == 400, response.text
    assert response.json()["problems"]


@pytest.mark.parametrize("path", ["%2e", "%2e/", ".", "x" * 300])
def test_hostile_output_paths_are_refused_not_500(client, path):
    status = client.get(f"/api/outputs/{path}").status_code
    assert status < 500 and status != 200, status


@pytest.mark.parametrize("field", ["layout", "meta"])
def test_deep_json_is_refused_at_parse_time(server, client, field):
    document = count_workflow(steps=1)
    document[field] = nested(700)
    body = json.dumps({"workflow": document})
    response = client.post("/api/runs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested deeper" in response.json()["error"]
    wait_idle(server)
    for item in client.get("/api/runs", params={"limit": 5}).json()["history"]:  # nothing stored breaks reads
        assert client.get(f"/api/runs/{item['run_id']}").status_code == 200


def test_chunked_body_over_the_json_cap_gets_413(server):
    def chunks():
        yield b'{"workflow": "'
        for _ in range(17):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(server.base_url + "/api/validate", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text


def test_rename_refuses_a_trailing_newline(client):
    assert client.put("/api/workflows/rename-me", json=count_workflow(steps=1)).status_code == 200
    for new_name in ("x/a\n/y", "a\n/b"):
        response = client.post("/api/workflows/rename-me/rename", json={"new_name": new_name})
        assert response.status_code == 400, new_name
    client.delete("/api/workflows/rename-me")


def test_models_lists_only_what_can_be_loaded(server, client, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not inside the models folder")
    loras = server.root / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "inside.safetensors").write_bytes(b"x")
    link = loras / "escape.safetensors"
    link.unlink(missing_ok=True)
    os.symlink(outside, link)
    listed = client.get("/api/models").json()["kinds"]["loras"]
    assert "inside.safetensors" in listed and "escape.safetensors" not in listed


def test_queue_front_runs_a_queued_run_next(server, client):
    wait_idle(server)
    blocker = client.post("/api/runs", json={"workflow": count_workflow(steps=40, delay=0.05, start=1)}).json()["run_id"]
    server.wait_run(client, blocker, until=("running",))
    later = [client.post("/api/runs", json={"workflow": count_workflow(steps=1, start=i)}).json()["run_id"]
             for i in (10, 20, 30)]
    moved = client.post(f"/api/queue/{later[2]}/front")
    assert moved.status_code == 200 and moved.json()["position"] == 0
    assert client.get(f"/api/runs/{later[0]}").json()["position"] == 1
    urgent = client.post("/api/runs", json={"workflow": count_workflow(steps=1, start=40), "front": True}).json()
    assert urgent["position"] == 0
    records = [server.wait_run(client, run_id) for run_id in [urgent["run_id"], *later]]
    order = sorted(records, key=lambda r: r["started"])
    assert [r["run_id"] for r in order] == [urgent["run_id"], later[2], later[0], later[1]]
    assert client.post(f"/api/queue/{blocker}/front").status_code == 409
    assert client.post("/api/queue/no-such-run/front").status_code == 404


def test_cli_deeply_nested_file_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITGRAPH_PLUGINS", TEST_NODES)
    document = count_workflow(steps=1)
    text = json.dumps(document)
    path = tmp_path / "deep.json"  # meta nested 5000 levels (json.dumps itself cannot write that)
    path.write_text(text.replace('"meta": {', '"meta": ' + '{"x": ' * 5000 + '{' + '}' * 5000 + ', "m": {', 1))
    assert main(["validate", str(path)]) == 2
    assert "nested deeper" in capsys.readouterr().err


def test_cli_hostile_file_input_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITGRAPH_PLUGINS", TEST_NODES)
    monkeypatch.setenv("DITGRAPH_INPUTS", str(tmp_path))
    document = workflow({"1": {"type": "LoadImage", "inputs": {"image": "."}},
                         "2": {"type": "PreviewImage", "inputs": {"images": {"from": ["1", "image"]}}}})
    path = tmp_path / "dot.json"
    path.write_text(json.dumps(document))
    for name in (".", "./", "y" * 300):
        assert main(["validate", str(path), "--set", f"1.image={name}"]) == 2, name
    capsys.readouterr()


def test_cli_caps_the_problem_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITGRAPH_PLUGINS", TEST_NODES)
    document = workflow({str(i): {"type": "SlowCount", "inputs": {"steps": -1}} for i in range(500)})
    path = tmp_path / "many.json"
    path.write_text(json.dumps(document))
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) <= 52 and re.fullmatch(r"\.\.\. and \d{3} more \(--json lists them all\)", lines[-2]), lines[-3:]


@pytest.mark.parametrize("token", ["with space 1234", "semi;colon1234", "t\u00f6k\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac",
                                   "short12", 'quo"te12345', "com,ma12345", "back\\slash123"])
def test_tokens_a_cookie_cannot_carry_are_refused_at_startup(token, capsys):
    from app.fronts.http.settings import ConfigError, Settings

    with pytest.raises(ConfigError):
        Settings(token=token).check()
    assert main(["serve", "--port", "1", "--token", token]) == 2


def test_workflow_names_outside_the_documented_set_get_400(client):
    document = count_workflow(steps=1)
    assert client.put("/api/workflows/a/b/c/four (ok)", json=document).status_code == 200  # 4 parts: folders
    assert client.delete("/api/workflows/a/b/c/four (ok)").status_code == 200
    for bad in ("a/b/c/d/five", "semi;colon", "tag<b>", "star*", ".hidden", "a/.b"):
        assert client.put(f"/api/workflows/{bad}", json=document).status_code == 400, bad
    assert client.put("/api/workflows/new%0Aline", json=document).status_code == 404  # no route matches a newline


def test_refused_websockets_get_an_http_403_handshake(server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/api/events?client_id=x", origin="http://evil.example", open_timeout=5)
    assert refused.value.response.status_code == 403


def test_allow_origin_trusts_exactly_the_named_origins():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.fronts.http.security import Guard
    from app.fronts.http.settings import Settings

    inner = Starlette(routes=[Route("/api/x", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])])
    settings = Settings(allowed_origins=["http://trusted.example"], allowed_hosts=["testserver"])
    client = TestClient(Guard(inner, settings))
    assert client.post("/api/x", headers={"Origin": "http://trusted.example"}).status_code == 200
    assert client.post("/api/x", headers={"Origin": "http://other.example"}).status_code == 403
    assert client.post("/api/x", headers={"Origin": "http://testserver"}).status_code == 200  # same origin
    assert client.post("/api/x", content=b"{}" * (9 << 20), headers={"content-type": "application/json"}).status_code == 413


def test_the_allow_origin_flag_reaches_the_guards_settings(monkeypatch, tmp_path):
    import app.fronts.http.app as http_app
    from app.core import paths
    from bench.harness import free_port

    monkeypatch.setattr(paths, "_overrides", dict(paths._overrides))  # serve sets folders for the process
    seen = {}
    monkeypatch.setattr(http_app, "serve", lambda *args, settings, **kwargs: seen.update(origins=settings.allowed_origins))
    assert main(["serve", "--port", str(free_port()), "--device", "cpu", "--db", str(tmp_path / "q.sqlite3"),
                 "--allow-origin", "http://trusted.example"]) == 0
    assert seen["origins"] == ["http://trusted.example"]


def test_a_non_latin_1_token_in_the_query_is_a_401_not_a_500():
    from tests.fixtures._server_helpers import shared_token_server

    token_server = shared_token_server()
    for query in ("token=%E2%82%AC%E2%82%AC", "token=%FF", "token=a%20b"):
        assert httpx.get(f"{token_server.base_url}/?{query}").status_code == 401, query
        assert httpx.get(f"{token_server.base_url}/api/status?{query}").status_code == 401, query
