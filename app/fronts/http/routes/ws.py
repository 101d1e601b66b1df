"""The websocket event stream: a run's events to the client that queued it (or every run's with mode=all)."""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from app.fronts.http.bodies import api_router
from app.fronts.http.state import AppState, Connection


def routes(state: AppState) -> APIRouter:
    router = api_router(state)

    @router.websocket("/events")
    async def events(websocket: WebSocket, client_id: str | None = None, mode: str = "own") -> None:
        await websocket.accept()
        if client_id is None or not (0 < len(client_id) <= 200):
            client_id = os.urandom(8).hex()
        connection = Connection(client_id, mode == "all", asyncio.get_running_loop(), asyncio.Queue(maxsize=2000))
        state.add_connection(connection)
        counts = state.run_queue().store.counts()
        await websocket.send_text(json.dumps({"type": "hello", "client_id": client_id, "mode": "all" if connection.all_runs else "own",
                                              "queued": counts.get("queued", 0), "running": counts.get("running", 0)}))

        async def pump() -> None:
            while True:
                await websocket.send_text(await connection.outbox.get())

        sender = asyncio.create_task(pump())
        try:
            while True:
                message = await websocket.receive_text()
                if message == "ping":
                    await websocket.send_text(json.dumps({"type": "pong"}))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            state.remove_connection(connection)
            sender.cancel()

    return router
