"""Tidy the shipped workflows the editor finds hard to read (boxes smaller than their widgets, overlaps, tiny titles).

    python scripts/tidy_graph_layouts.py [NAME ...]      # default: every graphs/*.json that fails

Opens each workflow in the real editor (``ditgraph serve`` + headless Chromium, as the layout test
does), grows boxes to what their widgets need, runs "Arrange" (auto layout) where boxes then overlap
or titles are too small, and writes the node positions and sizes back into the file's ``layout``;
nothing else in the file changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import REPO, BrowserPage, chromium, running_server  # noqa: E402

LAPTOP = {"width": 1366, "height": 768}


def main(names: list[str]) -> int:
    paths = [REPO / "graphs" / f"{n}.json" for n in names] or sorted((REPO / "graphs").glob("*.json"))
    with running_server("ditgraph-tidy-") as server, chromium() as browser:
        context = browser.new_context(viewport=LAPTOP)
        tab = BrowserPage(context, server)
        tab.open()
        for path in paths:
            doc = json.loads(path.read_text())
            tab.js("ed.openDocument(arg)", doc)
            tab.wait("ed.graph._nodes.length === arg", arg=len(doc["nodes"]))
            # grow boxes to what their widgets need (e.g. after a node gained an input), then check
            grown = tab.js("ed.graph._nodes.filter(n => { const c = n.computeSize(); const g = c[0] > n.size[0] + 1 || "
                           "c[1] > n.size[1] + 1; if (g) n.setSize([Math.max(c[0], n.size[0]), Math.max(c[1], n.size[1])]); "
                           "return g; }).length")
            seen = tab.js("ed.readability()")
            if not names and not grown and seen["titlePx"] >= 11 and not seen["overlaps"]:
                continue
            if names or seen["titlePx"] < 11 or seen["overlaps"]:
                tab.js("ed.arrange()")
            laid = tab.js("ed.workflow().layout")
            doc["layout"] = {**doc.get("layout", {}), "nodes": laid["nodes"], "groups": laid.get("groups", [])}
            doc["layout"].pop("viewport", None)
            path.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"{path.name}: {grown} box(es) grown; readability {seen}")
        context.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
