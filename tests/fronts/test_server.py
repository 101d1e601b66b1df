"""The HTTP API through a real server process: round trip, events, files, workflows, security."""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.core.images import png_text_chunks, sniff_image
from tests.fixtures._server_helpers import (
    ServerProcess,
    count_workflow,
    shared_server,
    shared_token_server,
    wait_idle,
    workflow,
)


@pytest.fixture(scope="module")
def server():
    proc = shared_server()
    wait_idle(proc)
    return proc


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


class EventCollector:
    """A websocket client collecting events in a thread."""

    def __init__(self, server: ServerProcess, query: str, headers: dict | None = None):
        self.socket = connect(f"ws://127.0.0.1:{server.port}/api/events?{query}", additional_headers=headers or {},
                              open_timeout=10).__enter__()
        self.events: list[dict] = []
        self.hello = json.loads(self.socket.recv(timeout=10))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.socket:
                self.events.append(json.loads(message))
        except Exception:
            pass

    def wait_for(self, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no matching event; got {[e.get('type') for e in self.events]}")

    def close(self) -> None:
        self.socket.close()


def png_bytes(text_chunks: dict[str, str] | None = None, size=(4, 4)) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def raw_get(server: ServerProcess, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (no client-side normalisation of ../ or %2e)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("GET", path, skip_accept_encoding=True)
    for key, value in (headers or server.headers()).items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


# -- catalogue, status, schema -----------------------------------------------------------------------------


def test_status_nodes_and_openapi(client):
    status = client.get("/api/status").json()
    assert status["version"] and status["device"]["name"] == "cpu"
    assert {"entries", "bytes"} <= set(status["memo"]) and "queued" in status["queue"]
    types = {entry["type"] for entry in client.get("/api/nodes").json()}
    assert {"PrimitiveInt", "SlowCount", "SaveText"} <= types
    schema = client.get("/openapi.json").json()
    for path in ("/api/runs", "/api/runs/{run_id}", "/api/validate", "/api/uploads", "/api/workflows/{name}",
                 "/api/status", "/api/outputs/{path}"):
        assert path in schema["paths"], path


def test_validate_reports_every_problem(client):
    document = workflow({"1": {"type": "SlowCount", "inputs": {"steps": -1}}, "2": {"type": "Nope"},
                         "3": {"type": "PreviewAny", "inputs": {"value": {"from": ["9", "value"]}}}})
    answer = client.post("/api/validate", json={"workflow": document}).json()
    assert answer["valid"] is False
    kinds = {p["kind"] for p in answer["problems"]}
    assert {"bad_value", "unknown_type", "bad_link"} <= kinds
    ok = client.post("/api/validate", json={"workflow": count_workflow()}).json()
    assert ok["valid"] is True


# -- the round trip ---------------------------------------------------------------------------------------------


def test_round_trip_with_private_events(server, client):
    mine = EventCollector(server, "client_id=tab-a")
    other = EventCollector(server, "client_id=tab-b")
    everything = EventCollector(server, "client_id=monitor&mode=all")
    try:
        assert mine.hello["client_id"] == "tab-a"
        answer = client.post("/api/runs", json={"workflow": count_workflow(steps=4, delay=0.01, prefix="rt"),
                                                "client_id": "tab-a"})
        assert answer.status_code == 200, answer.text
        run_id = answer.json()["run_id"]
        assert answer.json()["position"] in (0, None)
        finished = mine.wait_for(lambda e: e.get("type") == "run_finished" and e.get("run_id") == run_id)
        assert finished["executed"]
        types = [e["type"] for e in mine.events if e.get("run_id") == run_id]
        for expected in ("run_queued", "run_started", "node_started", "progress", "node_finished", "run_finished"):
            assert expected in types, (expected, types)
        progress = [e for e in mine.events if e.get("type") == "progress" and e.get("run_id") == run_id]
        assert [p["step"] for p in progress] == [1, 2, 3, 4]
        assert progress[0]["preview"].startswith("data:image/png;base64,")
        everything.wait_for(lambda e: e.get("type") == "run_finished" and e.get("run_id") == run_id)
        time.sleep(0.2)
        assert not [e for e in other.events if e.get("run_id") == run_id], "events leaked to another client"

        record = client.get(f"/api/runs/{run_id}").json()
        assert record["status"] == "success" and record["client_id"] == "tab-a"
        assert record["ui"]["4"]["text"] == ["4"] and set(record["timings"]) >= {"1", "2", "3"}
        assert record["reasons"]["1"] and record["workflow"]["nodes"]["1"]["type"] == "SlowCount"
        [output] = record["outputs"]
        assert output["node"] == "3" and output["url"].startswith(f"/api/outputs/{run_id}/")
        fetched = client.get(output["url"])
        assert fetched.status_code == 200 and fetched.text == "4"
        assert fetched.headers["x-content-type-options"] == "nosniff"

        runs = client.get("/api/runs", params={"limit": 5}).json()
        assert run_id in [r["run_id"] for r in runs["history"]] and runs["history_total"] >= 1
        assert "workflow" not in runs["history"][0]
    finally:
        for collector in (mine, other, everything):
            collector.close()


def test_outputs_never_overwritten(server, client):
    documents = [count_workflow(steps=1, prefix="same", start=10), count_workflow(steps=1, prefix="same", start=20),
                 count_workflow(steps=1, prefix="same", start=10)]  # the third repeats the first: all cache hits
    ids = [client.post("/api/runs", json={"workflow": d}).json()["run_id"] for d in documents]
    records = [server.wait_run(client, run_id) for run_id in ids]
    assert all(r["status"] == "success" for r in records)
    urls = [r["outputs"][0]["url"] for r in records]
    assert urls[0] != urls[1] and urls[0].startswith(f"/api/outputs/{ids[0]}/")
    assert records[2]["cached"] and urls[2] == urls[0]  # a cached save still points at its file
    assert [client.get(url).text for url in urls] == ["11", "21", "11"]


def test_invalid_run_is_refused_and_not_queued(client):
    before = client.get("/api/runs").json()
    answer = client.post("/api/runs", json={"workflow": workflow({"1": {"type": "SlowCount", "inputs": {"steps": "x"}}})})
    assert answer.status_code == 400
    body = answer.json()
    assert body["problems"] and any(p["node"] == "1" and p["input"] == "steps" for p in body["problems"])
    assert client.post("/api/runs", json={"workflow": "not a workflow"}).status_code == 400
    assert client.post("/api/runs", json={"nothing": 1}).status_code == 422
    assert client.post("/api/runs", content=b"{broken", headers={"content-type": "application/json"}).status_code == 422
    after = client.get("/api/runs").json()
    assert after["history_total"] == before["history_total"] and len(after["queue"]) == len(before["queue"])


def test_failed_run_names_the_node(server, client):
    document = workflow({"1": {"type": "Fail", "inputs": {"message": "broken on purpose"}},
                         "2": {"type": "PreviewAny", "inputs": {"value": {"from": ["1", "value"]}}}})
    run_id = client.post("/api/runs", json={"workflow": document}).json()["run_id"]
    record = server.wait_run(client, run_id)
    assert record["status"] == "failed"
    assert record["error"]["node"] == "1" and "broken on purpose" in record["error"]["message"]
    assert client.get("/api/status").status_code == 200  # still serving


def test_cancel_running_and_queued(server, client):
    watcher = EventCollector(server, "client_id=canceller")
    try:
        slow = client.post("/api/runs", json={"workflow": count_workflow(steps=400, delay=0.02), "client_id": "canceller"}).json()
        queued = client.post("/api/runs", json={"workflow": count_workflow(steps=400, delay=0.02, start=1),
                                                "client_id": "canceller"}).json()
        assert queued["position"] >= 0
        watcher.wait_for(lambda e: e.get("type") == "progress" and e.get("run_id") == slow["run_id"])
        listing = client.get("/api/runs").json()["queue"]
        assert [r["status"] for r in listing][:2] == ["running", "queued"]
        assert client.delete(f"/api/runs/{queued['run_id']}").json()["status"] == "cancelled"
        assert client.delete(f"/api/runs/{slow['run_id']}").json()["status"] == "cancelling"
        record = server.wait_run(client, slow["run_id"], timeout=10)
        assert record["status"] == "cancelled"
        assert client.get(f"/api/runs/{queued['run_id']}").json()["status"] == "cancelled"
        watcher.wait_for(lambda e: e.get("type") == "run_cancelled" and e.get("run_id") == slow["run_id"])
        assert client.delete("/api/runs/does-not-exist").status_code == 404

        a = client.post("/api/runs", json={"workflow": count_workflow(steps=400, delay=0.02, start=2)}).json()["run_id"]
        b = client.post("/api/runs", json={"workflow": count_workflow(steps=400, delay=0.02, start=3)}).json()["run_id"]
        server.wait_run(client, a, until=("running",))
        answer = client.post("/api/runs/cancel-all").json()
        assert b in answer["cancelled"] and a in answer["cancelling"]
        assert server.wait_run(client, a, timeout=10)["status"] == "cancelled"
    finally:
        watcher.close()


# -- files ---------------------------------------------------------------------------------------------------------


def test_output_path_traversal_is_refused(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (server.output_dir / "ok.txt").write_text("fine")
    (server.output_dir / "page.html").write_text("<script>alert(1)</script>")
    (server.output_dir / "image.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    link = server.output_dir / "escape"
    if not link.exists():
        os.symlink(tmp_path, link)
    assert raw_get(server, "/api/outputs/ok.txt") == (200, b"fine")
    attempts = [
        "/api/outputs/../../../../etc/passwd",
        "/api/outputs/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/api/outputs/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/outputs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/api/outputs//etc/passwd",
        "/api/outputs/%2Fetc%2Fpasswd",
        "/api/outputs/escape/secret.txt",
        f"/api/outputs/..%2f{secret.parent.name}%2fsecret.txt",
        "/api/outputs/.", "/api/outputs/%2e", "/api/outputs/" + "x" * 300,  # sent as they are, not normalised
    ]
    for path in attempts:
        status, body = raw_get(server, path)
        assert status in (400, 403, 404), (path, status)
        assert b"top secret" not in body and b"root:" not in body, path
    status, _ = raw_get(server, "/api/outputs/missing.png")
    assert status == 404
    with server.client() as c:
        html = c.get("/api/outputs/page.html")
        assert html.headers["content-type"] == "application/octet-stream"
        assert "attachment" in html.headers.get("content-disposition", "")
        assert c.get("/api/outputs/image.svg").headers["content-type"] == "application/octet-stream"  # any unknown type


def test_uploads(server, client):
    data = png_bytes()
    first = client.post("/api/uploads", files={"image": ("../../evil name.png", data, "image/png")})
    assert first.status_code == 200, first.text
    name = first.json()["name"]
    assert "/" not in name and ".." not in name and name.endswith(".png")
    assert (server.input_dir / name).read_bytes() == data
    again = client.post("/api/uploads", files={"file": ("other.png", data, "image/png")}).json()
    assert again["format"] == "png" and again["width"] == 4

    jpeg = io.BytesIO()
    Image.new("RGB", (3, 3)).save(jpeg, format="JPEG")
    assert client.post("/api/uploads", files={"image": ("x.jpg", jpeg.getvalue(), "image/jpeg")}).json()["format"] == "jpeg"
    webp = io.BytesIO()
    Image.new("RGB", (3, 3)).save(webp, format="WEBP")
    assert client.post("/api/uploads", files={"image": ("x.webp", webp.getvalue(), "image/webp")}).json()["format"] == "webp"

    fake = client.post("/api/uploads", files={"image": ("x.png", b"<html>not an image</html>", "image/png")})
    assert fake.status_code == 415
    svg = client.post("/api/uploads", files={"image": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")})
    assert svg.status_code == 415
    damaged = client.post("/api/uploads", files={"image": ("x.png", data[:40], "image/png")})
    assert damaged.status_code == 400
    assert client.post("/api/uploads", files={"other": ("x.png", data, "image/png")}).status_code == 400
    huge = client.post("/api/uploads", content=b"\x89PNG\r\n\x1a\n" + b"\0" * (34 << 20),
                       headers={"content-type": "application/octet-stream"})
    assert huge.status_code == 413
    assert client.get("/api/status").status_code == 200


def test_workflow_from_png(client):
    document = count_workflow()
    png = png_bytes({"workflow": json.dumps(document)})
    assert png_text_chunks(png)["workflow"] == json.dumps(document)
    answer = client.post("/api/workflow-from-png", files={"file": ("w.png", png, "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["workflow"]["nodes"] == document["nodes"]
    bare = client.post("/api/workflow-from-png", files={"file": ("w.png", png_bytes(), "image/png")})
    assert bare.status_code == 422
    not_png = client.post("/api/workflow-from-png", files={"file": ("w.png", b"GIF89a....", "image/png")})
    assert not_png.status_code == 415
    comfy = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 3}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    from_comfy = client.post("/api/workflow-from-png", files={"file": ("c.png", png_bytes({"prompt": json.dumps(comfy)}), "image/png")})
    assert from_comfy.status_code == 200 and from_comfy.json()["source"] == "comfyui"


def test_png_text_chunks_compressed():
    payload = json.dumps({"a": 1}).encode()
    body = b"workflow\0\0" + zlib.compress(payload)
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + b"\0\0\0\0"
    png = png_bytes()
    iend = png.rindex(b"IEND") - 4
    assert png_text_chunks(png[:iend] + chunk + png[iend:])["workflow"] == payload.decode()
    assert sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "webp" and sniff_image(b"GIF89a") is None


def test_workflows_crud(server, client):
    (server.root / "shipped").mkdir(exist_ok=True)
    document = count_workflow()
    assert client.put("/api/workflows/mine", json=document).json()["saved"]
    assert client.put("/api/workflows/folder/deep one", json=document).status_code == 200
    names = {(w["name"], w["source"]) for w in client.get("/api/workflows").json()["workflows"]}
    assert ("mine", "user") in names and ("folder/deep one", "user") in names
    assert client.get("/api/workflows/mine").json()["nodes"] == document["nodes"]
    assert client.get("/api/workflows/mine.json").status_code == 200
    assert client.post("/api/workflows/mine/rename", json={"new_name": "renamed"}).status_code == 200
    assert client.get("/api/workflows/mine").status_code == 404
    assert client.post("/api/workflows/folder/deep one/rename", json={"new_name": "renamed"}).status_code == 409
    assert client.delete("/api/workflows/renamed").json()["deleted"]
    assert client.delete("/api/workflows/renamed").status_code == 404
    assert client.put("/api/workflows/bad", json={"nodes": {}}).status_code == 400
    for bad in ("../escape", "..%2fescape", ".hidden", "a/../../b", "x" * 300):
        answer = client.put(f"/api/workflows/{bad}", json=document)
        assert answer.status_code in (400, 403, 404, 405), (bad, answer.status_code)
    for path in ("/api/workflows/..%2f..%2fetc%2fpasswd", "/api/workflows/%2e%2e/%2e%2e/etc/passwd"):
        status, body = raw_get(server, path)
        assert status in (400, 403, 404) and b"root:" not in body
    assert not list(server.workflows_dir.parent.glob("escape*"))


# -- origin, host and token checks ----------------------------------------------------------------------------------


def test_cross_origin_and_foreign_host_are_refused(server):
    ok = httpx.get(server.base_url + "/api/status", headers={"Origin": server.base_url})
    assert ok.status_code == 200
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
        refused = httpx.post(server.base_url + "/api/runs", json={"workflow": count_workflow()}, headers={"Origin": origin})
        assert refused.status_code == 403, origin
    rebinding = httpx.get(server.base_url + "/api/status", headers={"Host": f"attacker.example:{server.port}"})
    assert rebinding.status_code == 403
    with pytest.raises(InvalidStatus):
        connect(f"ws://127.0.0.1:{server.port}/api/events?client_id=x", origin="http://evil.example", open_timeout=5)


@pytest.fixture(scope="module")
def token_server():
    return shared_token_server()


def test_token_is_required_everywhere(token_server):
    base = token_server.base_url
    assert httpx.get(base + "/api/status").status_code == 401
    assert httpx.get(base + "/api/status", headers={"Authorization": "Bearer wrong-token-xx"}).status_code == 401
    assert httpx.get(base + "/api/nodes", headers=token_server.headers()).status_code == 200
    assert httpx.get(base + "/api/status", params={"token": token_server.token}).status_code == 200
    assert httpx.get(base + "/").status_code == 401
    # with the token, a cross-origin request is allowed (e.g. a script on another machine)
    assert httpx.get(base + "/api/status", headers={**token_server.headers(), "Origin": "http://elsewhere"}).status_code == 200
    # visiting /?token=T stores it in a cookie for the page's own requests
    page = httpx.get(base + "/", params={"token": token_server.token})
    cookie = page.cookies.get("ditgraph_token")
    assert cookie == token_server.token
    assert httpx.get(base + "/api/status", cookies={"ditgraph_token": cookie}).status_code == 200
    # the token in the query also lets a request from another origin through
    assert httpx.get(base + "/api/status", params={"token": token_server.token},
                     headers={"Origin": "http://elsewhere"}).status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{token_server.port}/api/events", open_timeout=5)
    assert refused.value.response.status_code == 403  # refused at the handshake
    with connect(f"ws://127.0.0.1:{token_server.port}/api/events?token={token_server.token}", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"


def test_public_bind_needs_a_token(capsys, monkeypatch):
    from app.fronts.cli import main

    monkeypatch.delenv("DITGRAPH_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a token" in capsys.readouterr().err
