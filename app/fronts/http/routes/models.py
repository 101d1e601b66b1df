"""What the models folder holds, and the server's status (version, device, memo cache, queue)."""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter

import app as app_package
from app.core import paths
from app.fronts.http.bodies import api_router
from app.fronts.http.responses import JSONResponse
from app.fronts.http.state import AppState


def routes(state: AppState) -> APIRouter:
    router = api_router(state)
    settings = state.settings

    @router.get("/models", summary="What the models folder holds, by kind")
    def get_models() -> JSONResponse:
        return JSONResponse({"models_dir": str(paths.models_dir()),
                             "kinds": {kind: paths.list_files(kind) for kind in paths.MODEL_KINDS}})

    @router.get("/status", summary="Version, device, memo cache, queue")
    def get_status() -> JSONResponse:
        counts = state.run_queue().store.counts()
        engine = state.engine
        device = {"name": str(engine.device)}
        if engine.device.type == "cuda":
            with contextlib.suppress(Exception):
                import torch

                free, total = torch.cuda.mem_get_info(engine.device.index)  # None: the current device; a bare "cuda" is refused
                device.update(gpu=torch.cuda.get_device_name(engine.device), memory_free=free, memory_total=total)
        return JSONResponse({
            "version": app_package.__version__,
            "device": device,
            "memo": engine.cache.summary(),
            "queue": {"queued": counts.get("queued", 0), "running": counts.get("running", 0),
                      "finished": sum(counts.get(s, 0) for s in ("success", "failed", "cancelled"))},
            "dispatcher": state.run_queue().dispatcher.describe(),
            "nodes": len(state.registry.nodes),
            "load_errors": [{"source": e.source, "message": e.message} for e in state.registry.load_errors],
            "uptime": round(time.time() - state.started_at, 1),
            "auth": bool(settings.token),
        })

    return router
