"""File names are shown as text in the editor's dropdowns, never run as HTML (stored XSS)."""

from __future__ import annotations

import pytest

from bench.harness import VIEWPORT, BrowserPage, browser_skip_reason, chromium, running_server

pytestmark = pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")

HOSTILE = "<img src=x onerror=window.__xss=1>.png"


def test_a_hostile_file_name_in_a_dropdown_is_text():
    from PIL import Image

    with running_server("ditgraph-ui-xss-") as server, chromium() as browser:
        Image.new("RGB", (8, 8)).save(server.root / "input" / HOSTILE)
        context = browser.new_context(viewport=VIEWPORT)
        tab = BrowserPage(context, server)
        tab.open()
        tab.page.click('[data-testid="btn-new"]')
        tab.wait("ed.graph._nodes.length === 0")
        rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
        loader = tab.drag_from_palette("LoadImage", (rect[0] + 300, rect[1] + 200))
        tab.page.mouse.click(*tab.js("ed.widgetClientPos(arg, 'image', 0.5)", loader))
        entry = tab.page.locator(".litemenu-entry", has_text="onerror")
        entry.first.wait_for(timeout=10_000)
        tab.page.wait_for_timeout(500)  # an <img src=x> would have failed to load by now
        assert tab.js("window.__xss === undefined")
        assert HOSTILE in entry.first.text_content()
        assert tab.page.locator(".litemenu-entry img").count() == 0
        entry.first.click()  # choosing it still sets the real name
        assert tab.wait("ed.nodeInfo(arg).widgets.image", arg=loader) == HOSTILE
        context.close()
