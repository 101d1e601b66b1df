"""Videos are their own output kind over HTTP: the run's ``outputs`` and ``/api/history`` say
``kind: "video"`` with a poster, frame count and fps; the websocket's ``node_finished`` carries
``ui.videos``; a saved MP4 dropped back gives its workflow (``/api/workflow-from-png``)."""

from __future__ import annotations

import json
import time

import pytest
from websockets.sync.client import connect

from tests.fixtures._server_helpers import shared_server, wait_idle
from tests.fixtures.tiny_video import moving_box


@pytest.fixture(scope="module")
def video_run():
    """(server, client, run record, node_finished event of the save node) of one moving-box run."""
    server = shared_server()
    wait_idle(server)
    with server.client() as client, connect(f"ws://127.0.0.1:{server.port}/api/events?client_id=video-test",
                                            open_timeout=10) as socket:
        socket.recv(timeout=10)  # hello
        run_id = client.post("/api/runs", json={"workflow": moving_box(), "client_id": "video-test"}).json()["run_id"]
        finished = None
        deadline = time.monotonic() + 60
        while finished is None and time.monotonic() < deadline:
            event = json.loads(socket.recv(timeout=60))
            if event.get("type") == "node_finished" and event.get("node") == "save":
                finished = event
        record = server.wait_run(client, run_id)
        assert record["status"] == "success", record
        yield server, client, record, finished


def test_run_outputs_name_the_video_with_its_poster(video_run):
    server, client, record, _ = video_run
    (output,) = record["outputs"]
    assert output["kind"] == "video" and output["node"] == "save" and output["filename"].endswith(".mp4")
    assert (output["format"], output["frames"], output["fps"], output["width"], output["height"]) == ("mp4", 4, 4.0, 64, 64)
    video = client.get(output["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    poster = client.get(output["poster"])
    assert output["poster"].startswith("/api/temp/posters/")
    assert poster.status_code == 200 and poster.headers["content-type"] == "image/png"
    assert set(record["ui"]["save"]) == {"videos"}  # no "images": an image client is not handed an MP4


def test_node_finished_event_carries_the_video(video_run):
    _, _, _, finished = video_run
    (entry,) = finished["ui"]["videos"]
    assert entry["frames"] == 4 and entry["poster"]["type"] == "temp" and entry["poster"]["path"].startswith("posters/")


def test_history_lists_the_video(video_run):
    _, client, record, _ = video_run
    runs = client.get("/api/history", params={"workflow": "moving-box"}).json()["runs"]
    (listed,) = [r for r in runs if r["run_id"] == record["run_id"]]
    assert [(o["kind"], o["poster"]) for o in listed["outputs"]] == [("video", record["outputs"][0]["poster"])]


def test_saved_mp4_gives_back_its_workflow(video_run):
    _, client, record, _ = video_run
    data = client.get(record["outputs"][0]["url"]).content
    answer = client.post("/api/workflow-from-png", files={"file": ("box.mp4", data, "video/mp4")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["source"] == "ditgraph" and answer.json()["workflow"]["nodes"] == moving_box()["nodes"]
