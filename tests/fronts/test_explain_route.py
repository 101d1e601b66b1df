"""POST /api/explain (app/fronts/http/routes/nodes.py) carries each loader's VRAM plan: the
same description as ``ditgraph explain``, under the server's budget, for the device runs use."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.executor import Engine
from app.core.plugins import make_registry
from app.fronts.http.routes import nodes as node_routes
from app.fronts.http.settings import Settings
from app.fronts.http.state import AppState
from app.models.budget import memory_settings
from tests.fixtures._server_helpers import REPO

SHAPES = json.loads((REPO / "graphs" / "shapes-txt2img.json").read_text())


@pytest.fixture(scope="module")
def registry():
    return make_registry([])


def _client(registry, tmp_path, device: str, vram: str, ray: str | None = None) -> tuple[TestClient, AppState]:
    engine = Engine(registry, device=device, memory=memory_settings(vram))
    state = AppState(engine, Settings(db_path=tmp_path / "q.sqlite3", workflows_dir=tmp_path / "wf", ray=ray))
    app = FastAPI()
    app.include_router(node_routes.routes(state))
    return TestClient(app), state


def test_explain_returns_the_loaders_plan_under_the_servers_budget(registry, tmp_path):
    client, _ = _client(registry, tmp_path, "cuda", "310MB")  # plans for CUDA without one here
    report = client.post("/api/explain", json={"workflow": SHAPES}).json()
    plan = report["estimates"]["1"]
    assert plan["budget"] == "0.30 GiB"
    assert {m["name"]: m["mode"] for m in plan["models"]} == {"transformer": "stream", "minilm": "blocks", "vae": "model"}
    assert plan["lines"][0].startswith("VRAM budget 310.0 MiB") and len(plan["lines"]) == 4
    assert set(report["estimates"]) == {"1"}  # only nodes with an estimate hook


def test_with_ray_the_plan_is_for_the_workers_device(registry, tmp_path):
    """The server's own engine only validates (CPU, fp32); runs use the workers' GPUs (bf16)."""
    client, state = _client(registry, tmp_path, "cpu", "1GB", ray="auto")
    state.queue = SimpleNamespace(dispatcher=SimpleNamespace(describe=lambda: {"workers": [{"device": "cuda:0"}]}))
    weights = {m["name"]: m["weight_bytes"] for m in
               client.post("/api/explain", json={"workflow": SHAPES}).json()["estimates"]["1"]["models"]}
    state.settings.ray = None
    on_cpu = {m["name"]: m["weight_bytes"] for m in
              client.post("/api/explain", json={"workflow": SHAPES}).json()["estimates"]["1"]["models"]}
    assert all(2 * weights[name] == on_cpu[name] for name in on_cpu)
