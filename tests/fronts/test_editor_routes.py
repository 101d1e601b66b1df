"""The editor's routes (app/fronts/http/routes/editor.py): drafts, input previews, history."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app.fronts.http.routes.editor import seeds_of
from tests.fixtures._server_helpers import count_workflow, shared_server, wait_idle


@pytest.fixture(scope="module")
def client():
    server = shared_server()
    wait_idle(server)
    with server.client() as c:
        yield c


def test_drafts_round_trip_per_workspace(client):
    draft = {"name": None, "position": 1, "workflow": count_workflow(), "outputs": {"4": {"text": ["3"]}}}
    assert client.put("/api/drafts/ws-a/tab-1", json=draft).json()["saved"]
    assert client.put("/api/drafts/ws-a/tab-0", json={**draft, "position": 0}).json()["saved"]
    drafts = client.get("/api/drafts/ws-a").json()["drafts"]
    assert [d["id"] for d in drafts] == ["tab-0", "tab-1"]
    assert drafts[1]["outputs"] == {"4": {"text": ["3"]}}
    assert client.get("/api/drafts/ws-b").json()["drafts"] == []
    assert client.delete("/api/drafts/ws-a/tab-0").json()["deleted"]
    assert [d["id"] for d in client.get("/api/drafts/ws-a").json()["drafts"]] == ["tab-1"]
    assert client.put("/api/drafts/ws-a/..%2Fx", json=draft).status_code in (400, 404)
    assert client.put("/api/drafts/ws-a/t", json={"no": "workflow"}).status_code == 400
    # drafts never show up as saved workflows
    assert all(".drafts" not in w["name"] for w in client.get("/api/workflows").json()["workflows"])


def test_input_images_are_served_and_confined(client):
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(buffer, format="PNG")
    name = client.post("/api/uploads", files={"file": ("m.png", buffer.getvalue(), "image/png")}).json()["name"]
    response = client.get(f"/api/inputs/{name}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == buffer.getvalue()
    assert client.get("/api/inputs/../queue.sqlite3").status_code in (403, 404)


def test_history_lists_seeds_and_deletes(client):
    doc = count_workflow(steps=2, prefix="hist")
    doc["meta"]["name"] = "history-test"
    run_id = client.post("/api/runs", json={"workflow": doc}).json()["run_id"]
    shared_server().wait_run(client, run_id)
    listing = client.get("/api/history", params={"workflow": "history-test"}).json()
    assert [r["run_id"] for r in listing["runs"]] == [run_id]
    assert "history-test" in listing["workflows"]
    assert listing["runs"][0]["duration"] is not None
    assert client.delete(f"/api/history/{run_id}").json()["deleted"]
    assert client.get("/api/history", params={"workflow": "history-test"}).json()["runs"] == []
    assert client.delete(f"/api/history/{run_id}").status_code == 404


def test_seeds_of_reads_constant_seed_inputs():
    doc = {"nodes": {"1": {"inputs": {"seed": 7, "steps": 3}}, "2": {"inputs": {"noise_seed": 9, "seed": {"from": ["1", "x"]}}}}}
    assert seeds_of(doc) == [7, 9]
