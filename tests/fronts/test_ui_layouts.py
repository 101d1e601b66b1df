"""Every shipped workflow is readable at first sight on a 1366x768 laptop screen.

Opened in the editor, each graphs/*.json must show node titles at least 11 px tall
(zoom x title font size) with no two node boxes overlapping, using the node sizes the
editor computes (a node never draws smaller than its widgets need). A screenshot of each
goes to test-artifacts/ui/layout-<name>.png.
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.ui_helpers import REPO, BrowserPage, browser_skip_reason, chromium, running_server

pytestmark = pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")

SHIPPED = sorted((REPO / "graphs").glob("*.json"))
LAPTOP = {"width": 1366, "height": 768}


def test_shipped_workflows_are_readable_at_1366x768():
    assert SHIPPED
    with running_server("ditgraph-ui-layouts-") as server, chromium() as browser:
        context = browser.new_context(viewport=LAPTOP)
        tab = BrowserPage(context, server)
        tab.open()
        # narrow screen: the side panels start collapsed, the canvas gets the width
        assert tab.js("ed.app.classList.contains('dg-hide-palette') && ed.app.classList.contains('dg-hide-side')")
        failures = {}
        for path in SHIPPED:
            doc = json.loads(path.read_text())
            tab.js("ed.openDocument(arg)", doc)
            tab.wait("ed.graph._nodes.length === arg", arg=len(doc["nodes"]))
            # boxes as the editor sizes them: the saved size, grown to what the widgets need
            grown = tab.js("ed.graph._nodes.filter(n => { const c = n.computeSize(); return c[0] > n.size[0] + 1 || c[1] > n.size[1] + 1; }).map(n => n.id)")
            seen = tab.js("ed.readability()")
            tab.shot(f"layout-{path.stem}")
            if seen["titlePx"] < 11 or seen["overlaps"] or grown:
                failures[path.name] = {**seen, "smaller_than_needed": grown}
        assert tab.external == []
        assert not [e for e in tab.errors if "404" not in e], tab.errors
        context.close()
    assert not failures, failures
