"""Browser tests of videos in the editor (real ``ditgraph serve`` + Chromium, see
tests/fixtures/ui_helpers.py): an MP4 saved by SaveVideo, dropped on the canvas, opens its
workflow; a finished video run plays a <video> on its save node (poster first) and in History."""

from __future__ import annotations

import pytest

from app.core.executor import Engine
from tests.fixtures.tiny_video import moving_box
from tests.fixtures.ui_helpers import (  # noqa: F401 - fixtures
    BrowserPage,
    browser_fixture,
    browser_skip_reason,
    click_run,
    drop_file,
    server_fixture,
    tab_fixture,
    wait_run_done,
)

pytestmark = pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")


def test_dropped_mp4_restores_its_workflow(tab: BrowserPage, tmp_path, monkeypatch):
    monkeypatch.setenv("DITGRAPH_TEMP", str(tmp_path / "temp"))
    result = Engine(device="cpu", output_dir=tmp_path).run(moving_box(name="dropped-box")).raise_for_status()
    data = (tmp_path / result.ui["save"]["videos"][0]["filename"]).read_bytes()
    tabs = tab.js("ed.tabs.list.length")
    drop_file(tab, data, "box_00001.mp4", "video/mp4")
    tab.wait("ed.tab.title === 'dropped-box'")
    assert tab.js("ed.tabs.list.length") in (tabs, tabs + 1)  # an untouched empty tab is reused
    nodes = tab.js("ed.workflow().nodes")
    expected = moving_box()["nodes"]
    assert {k: v["type"] for k, v in nodes.items()} == {k: v["type"] for k, v in expected.items()}
    for key, node in expected.items():  # the editor adds the widgets' defaults (SaveVideo's quality)
        assert node["inputs"].items() <= nodes[key]["inputs"].items(), key


def test_finished_video_run_plays_on_the_node_and_in_history(tab: BrowserPage):
    tab.js("ed.openDocument(arg)", moving_box())
    tab.wait("ed.tab.title === 'moving-box' && ed.nodeInfo('save') !== null")
    wait_run_done(tab, click_run(tab))
    # the save node holds a playing <video> of the published file, its poster shown until a frame is decoded
    video = tab.wait("(v => v && v.readyState >= 2 && v)(ed.nodeInfo('save').videos[0])")
    assert video["tag"] == "VIDEO" and video["url"].endswith(".mp4") and video["poster"].startswith("/api/temp/posters/")
    assert (video["width"], video["height"]) == (64, 64)
    tab.wait("ed.nodeInfo('save').videos[0].posterLoaded && ed.nodeInfo('save').videoFramesDrawn > 0")
    assert tab.js("ed.nodeInfo('save').images") == 0  # the MP4 is not an image
    # node_finished shows the video, then the run's record names the same file: it keeps playing, not reloaded
    assert tab.js("(n => { const el = n.outputVideos[0].el;"
                  " ed.setNodeVideos(n, n.outputVideos.map(({ url, poster }) => ({ url, poster })));"
                  " return n.outputVideos[0].el === el && el.readyState >= 2; })"
                  "(ed.graph._nodes.find(n => n.outputVideos?.length))")
    tab.shot("video_01_node")

    tab.page.click('[data-testid="btn-history"]')
    card = tab.page.wait_for_selector('[data-testid="history-run"] video[data-testid="history-video"]')
    assert card.get_attribute("src").endswith(".mp4") and "/api/temp/posters/" in card.get_attribute("poster")
    tab.wait("(async () => { const i = new Image(); i.src = document.querySelector('[data-testid=history-video]').poster;"
             " await i.decode(); return i.naturalWidth === 64; })()")
    tab.shot("video_02_history")
    tab.page.keyboard.press("Escape")
