"""One subgraph workflow (format v2) runs the same from the CLI, the HTTP API and the editor.

The subgraph ``Greet`` joins a fixed greeting with a promoted ``name`` input; the outer graph
uses it twice (one instance keeps the default name) and previews both results. Each front
must report the same texts, and name the inner nodes as ``<instance>/<inner id>``.
"""

from __future__ import annotations

import json
import time

import pytest

from app.fronts.cli import main
from tests.fixtures._server_helpers import shared_server, wait_idle
from tests.fixtures.ui_helpers import BrowserPage, browser_skip_reason, chromium, running_server

GREET = {
    "inputs": {"name": {"type": "STRING", "default": "world"}},
    "outputs": {"text": {"from": ["join", "string"]}},
    "nodes": {"join": {"type": "StringConcatenate",
                       "inputs": {"string_a": "hello ", "string_b": {"from": ["@in", "name"]}}}},
}
DOCUMENT = {
    "format": "ditgraph/workflow", "version": 2, "meta": {"name": "greetings"}, "layout": {},
    "subgraphs": {"Greet": GREET},
    "nodes": {
        "a": {"type": "subgraph:Greet", "inputs": {"name": "ditgraph"}},
        "b": {"type": "subgraph:Greet", "inputs": {}},
        "show_a": {"type": "PreviewAny", "inputs": {"value": {"from": ["a", "text"]}}},
        "show_b": {"type": "PreviewAny", "inputs": {"value": {"from": ["b", "text"]}}},
    },
}
EXPECTED = {"show_a": {"text": [repr("hello ditgraph")]}, "show_b": {"text": [repr("hello world")]}}  # PreviewAny shows repr
INNER = {"a/join", "b/join"}


def test_cli_runs_the_subgraph_workflow(tmp_path, capsys):
    path = tmp_path / "greetings.json"
    path.write_text(json.dumps(DOCUMENT))
    assert main(["run", str(path), "--json", "--device", "cpu", "--output-dir", str(tmp_path / "out")]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    shown = {e["node"]: e["ui"] for e in events if e.get("type") == "node_finished" and e.get("node") in EXPECTED}
    assert shown == EXPECTED
    assert INNER <= {e["node"] for e in events if e.get("type") == "node_started"}


def test_http_runs_the_subgraph_workflow():
    server = shared_server()
    wait_idle(server)
    with server.client() as client:
        answer = client.post("/api/runs", json={"workflow": DOCUMENT})
        assert answer.status_code == 200, answer.text
        run_id = answer.json()["run_id"]
        deadline = time.monotonic() + 60
        while (record := client.get(f"/api/runs/{run_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
    assert record["status"] == "success", record
    assert {node: record["ui"][node] for node in EXPECTED} == EXPECTED
    assert INNER <= set(record["executed"])


@pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")
def test_editor_runs_the_subgraph_workflow():
    with running_server("ditgraph-ui-subgraph-") as server, chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 860})
        tab = BrowserPage(context, server)
        tab.open()
        tab.js("ed.openDocument(arg)", DOCUMENT)
        tab.wait("ed.graph._nodes.length === 4")
        assert tab.js("ed.workflow().subgraphs.Greet.nodes.join.type") == "StringConcatenate"
        before = tab.js("ed.lastRunId ?? null")
        tab.page.click('[data-testid="btn-run"]')
        run_id = tab.wait("ed.lastRunId && ed.lastRunId !== arg && ed.lastRunId", arg=before)
        event = tab.wait("ed.eventLog.find(e => e.run_id === arg && ['run_finished', 'run_failed'].includes(e.type))",
                         arg=run_id, timeout=120)
        assert event["type"] == "run_finished", event
        record = tab.js("fetch('/api/runs/' + arg).then(r => r.json())", run_id)
        assert {node: record["ui"][node] for node in EXPECTED} == EXPECTED
        assert tab.external == []
        context.close()
