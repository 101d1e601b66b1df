"""Browser tests of the editor: a real ``ditgraph serve`` and headless Chromium, driven by mouse and keyboard.

Screenshots of each step go to test-artifacts/ui/. The tests that need core nodes only
always run; the txt2img flow needs the shipped shapes-dit workflow and its nodes and is
skipped, with the reason, until they exist.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from tests.fixtures.ui_helpers import (  # noqa: F401 - fixtures
    REPO,
    VIEWPORT,
    BrowserPage,
    browser_fixture,
    browser_skip_reason,
    click_run,
    drop_file,
    new_canvas,
    server_fixture,
    tab_fixture,
    wait_run_done,
)

pytestmark = pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")

BLUEPRINT = REPO / "graphs" / "shapes-txt2img.json"


def build_core_graph(tab: BrowserPage) -> dict[str, str]:
    """Seed -> MathInt.a -> PreviewAny, and PrimitiveInt -> PreviewAny, all by mouse."""
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    at = lambda x, y: (rect[0] + x, rect[1] + y)  # noqa: E731
    ids = {
        "seed": tab.drag_from_palette("Seed", at(60, 80)),
        "math": tab.drag_from_palette("MathInt", at(380, 80)),
        "preview": tab.drag_from_palette("PreviewAny", at(700, 80)),
        "prim": tab.drag_from_palette("PrimitiveInt", at(60, 340)),
        "preview2": tab.drag_from_palette("PreviewAny", at(700, 340)),
    }
    tab.connect(ids["seed"], "seed", ids["math"], "a")
    tab.connect(ids["math"], "value", ids["preview"], "value")
    tab.connect(ids["prim"], "value", ids["preview2"], "value")
    tab.wait("ed.graph.links.size === 3")
    return ids


def assert_same_workflow_nodes(tab: BrowserPage, ours: dict, theirs: dict) -> None:
    """Same nodes, links and values; inputs ``theirs`` leaves out may only hold the declared defaults."""
    defaults = {d["type"]: {i["name"]: i.get("default") for i in d["inputs"]} for d in tab.js("ed.catalogue")}
    assert ours.keys() == theirs.keys()
    for node_id, node in theirs.items():
        mine = ours[node_id]
        assert (mine["type"], mine.get("title"), mine.get("bypass")) == (node["type"], node.get("title"), node.get("bypass"))
        for name, value in mine["inputs"].items():
            expected = node["inputs"].get(name, defaults[node["type"]].get(name))
            assert value == expected, (node_id, name, value, expected)
        assert set(node["inputs"]) <= set(mine["inputs"]), node_id


def test_page_loads_local_files_and_default_workflow(tab: BrowserPage):
    assert tab.page.locator(".dg-category").count() >= 3
    tab.page.locator(".dg-category", has_text="core/primitives").click()  # categories start folded
    assert tab.page.locator(".dg-palette-item").count() >= 5
    assert tab.js("ed.catalogue.length") == len(tab.server.get_json("/api/nodes"))
    if BLUEPRINT.is_file():
        shipped = json.loads(BLUEPRINT.read_text())
        assert sorted(tab.js("Object.keys(ed.workflow().nodes)")) == sorted(shipped["nodes"])
    tab.wait("ed.statusEl.classList.contains('ok')", timeout=10)  # events websocket connected
    tab.shot("01_loaded")
    assert not [e for e in tab.errors if "404" not in e], tab.errors


@pytest.mark.skipif(not BLUEPRINT.is_file(), reason="graphs/shapes-txt2img.json is not shipped")
def test_hovering_a_loaders_title_shows_its_vram_plan(tab: BrowserPage):
    tab.js("ed.openExample('shapes-txt2img')")
    tab.wait("ed.nodesOfType('CheckpointLoader').length === 1")
    loader = tab.js("ed.nodesOfType('CheckpointLoader')[0]")
    tab.js("ed.fitNodes([arg], 1)", loader)
    tab.page.mouse.move(*tab.js("ed.titleClientPos(arg)", loader))
    tip = tab.page.locator('[data-testid="tooltip"]')
    tip.wait_for(state="visible")
    tab.wait("document.querySelector('[data-testid=tooltip]').textContent.includes('transformer: ')")
    text = tip.inner_text()  # the server runs on the CPU without --vram: no budget, all resident
    assert "Checkpoint" in text and "no VRAM budget" in text and "minilm: resident: " in text
    tab.shot("02c_vram_plan_tooltip")


def test_core_graph_by_mouse_then_reseed_reruns_only_descendants(tab: BrowserPage):
    new_canvas(tab)
    ids = build_core_graph(tab)
    workflow = tab.js("ed.workflow()")
    assert workflow["nodes"][ids["math"]]["inputs"]["a"] == {"from": [ids["seed"], "seed"]}
    assert workflow["nodes"][ids["preview"]]["inputs"]["value"] == {"from": [ids["math"], "value"]}
    run_id = click_run(tab)
    done = wait_run_done(tab, run_id)
    assert set(done["executed"]) == set(ids.values())
    tab.wait("ed.nodeInfo(arg).text === '0'", arg=ids["preview"])
    tab.shot("02_core_graph_run")

    # hovering a widget shows its declaration: type, range and tooltip
    tab.page.mouse.move(*tab.js("ed.widgetArrowClientPos(arg, 'seed', 0)", ids["seed"]))
    tip = tab.page.locator('[data-testid="tooltip"]')
    tip.wait_for(state="visible")
    assert "Same seed, same image." in tip.inner_text() and "INT" in tip.inner_text()
    tab.shot("02b_tooltip")

    # one click on the seed widget's right arrow: seed 0 -> 1
    x, y = tab.js("ed.widgetClientPos(arg, 'seed', 0.9)", ids["seed"])
    tab.page.mouse.click(x, y)
    tab.wait("ed.nodeInfo(arg).widgets.seed === 1", arg=ids["seed"])
    run_id = click_run(tab)
    done = wait_run_done(tab, run_id)
    assert set(done["executed"]) == {ids["seed"], ids["math"], ids["preview"]}
    assert set(done["cached"]) == {ids["prim"], ids["preview2"]}
    tab.wait("ed.nodeInfo(arg).text === '1'", arg=ids["preview"])
    assert tab.js("ed.nodeInfo(arg).runState", ids["prim"]) == "cached"
    tab.shot("03_core_graph_reseeded")

    # seed control "randomize": a new seed is drawn when Run is pressed, and the run uses it
    tab.page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'seed__control', 0)", ids["seed"]))
    tab.page.locator(".litemenu-entry", has_text="randomize").click()
    tab.wait("ed.nodeInfo(arg).widgets.seed__control === 'randomize'", arg=ids["seed"])
    run_id = click_run(tab)
    done = wait_run_done(tab, run_id)
    seed = tab.js("ed.nodeInfo(arg).widgets.seed", ids["seed"])
    assert seed != 1 and ids["seed"] in done["executed"]
    tab.wait("ed.nodeInfo(arg[0]).text === String(arg[1])", arg=[ids["preview"], seed])
    assert tab.js("ed.workflow().layout.nodes[arg].seed_control", ids["seed"]) == {"seed": "randomize"}


def test_type_mismatch_is_refused(tab: BrowserPage):
    new_canvas(tab)
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    text = tab.drag_from_palette("PrimitiveString", (rect[0] + 80, rect[1] + 100))
    math = tab.drag_from_palette("MathInt", (rect[0] + 420, rect[1] + 100))
    tab.connect(text, "value", math, "a")  # STRING -> INT: litegraph must refuse
    tab.page.wait_for_timeout(300)
    assert tab.link_count() == 0
    prim = tab.drag_from_palette("PrimitiveInt", (rect[0] + 80, rect[1] + 340))
    tab.connect(prim, "value", math, "a")  # INT -> INT: accepted
    tab.wait("ed.graph.links.size === 1")
    tab.shot("04_type_mismatch_refused")


def test_invalid_graph_shows_error_on_node_and_input(tab: BrowserPage):
    new_canvas(tab)
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    preview = tab.drag_from_palette("PreviewAny", (rect[0] + 300, rect[1] + 150))
    tab.page.click('[data-testid="btn-run"]')
    problems = tab.wait("ed.nodeInfo(arg).problems.length && ed.nodeInfo(arg).problems", arg=preview)
    assert problems[0]["input"] == "value" and problems[0]["kind"] == "missing_input"
    item = tab.page.locator(f'[data-testid="problem"][data-node="{preview}"]')
    assert item.count() == 1 and "value" in item.inner_text()
    tab.page.wait_for_selector('[data-testid="toast-error"]')
    tab.shot("05_invalid_graph_error")
    # fixing it clears the error live
    prim = tab.drag_from_palette("PrimitiveInt", (rect[0] + 20, rect[1] + 150))
    tab.connect(prim, "value", preview, "value")
    tab.wait("ed.nodeInfo(arg).problems.length === 0", arg=preview)

    # a bad widget value (a choice that does not exist) is shown on that widget after Validate
    math = tab.drag_from_palette("MathInt", (rect[0] + 20, rect[1] + 420))
    tab.js("(() => { const n = ed.graph.getNodeById(Number(arg)); n.widgets.find(w => w.name === 'operation').value = 'divide'; ed.changed('test'); })()", math)
    tab.page.click('[data-testid="btn-validate"]')
    problems = tab.wait("ed.nodeInfo(arg).problems.length && ed.nodeInfo(arg).problems", arg=math)
    assert ("operation", "bad_value") in [(p["input"], p["kind"]) for p in problems]
    assert tab.js("ed.isProblemWidget(ed.graph.getNodeById(Number(arg)), 'operation')", math)
    tab.shot("05b_bad_widget_value")


def test_save_reload_reopen_gives_same_graph(tab: BrowserPage):
    new_canvas(tab)
    ids = build_core_graph(tab)
    page = tab.page
    page.click('[data-testid="btn-save"]')
    page.fill('[data-testid="prompt-input"]', "ui-roundtrip")
    page.keyboard.press("Enter")
    page.wait_for_selector('[data-testid="toast-ok"]')
    saved_file = tab.server.root / "workflows" / "ui-roundtrip.json"
    assert saved_file.is_file()
    before = tab.js("ed.workflow()")
    on_disk = json.loads(saved_file.read_text())
    assert on_disk["nodes"] == before["nodes"]
    assert on_disk["layout"]["nodes"] == before["layout"]["nodes"]

    page.reload()
    page.wait_for_selector('.dg-root[data-ready="1"]')
    assert tab.js("ed.name") == "ui-roundtrip"  # the tab restores what it was editing
    new_canvas(tab)
    page.click('[data-testid="btn-open"]')
    page.click('[data-testid="saved-workflow"][data-name="ui-roundtrip"] .dg-open-name')
    tab.wait("ed.graph._nodes.length === arg", arg=len(ids))
    after = tab.js("ed.workflow()")
    assert after["nodes"] == before["nodes"]
    assert after["layout"]["nodes"] == before["layout"]["nodes"]
    assert tab.js("ed.name") == "ui-roundtrip" and not tab.js("ed.dirty")
    tab.shot("06_reopened")

    # rename through the dialog
    page.click('[data-testid="btn-rename"]')
    page.fill('[data-testid="prompt-input"]', "ui-renamed")
    page.keyboard.press("Enter")
    tab.wait("ed.name === 'ui-renamed'")
    assert (tab.server.root / "workflows" / "ui-renamed.json").is_file()
    assert not saved_file.exists()

    # the shipped examples are listed in the same dialog
    if BLUEPRINT.is_file():
        page.click('[data-testid="btn-open"]')
        page.click('[data-testid="example-workflow"][data-name="shapes-txt2img"] .dg-open-name')
        shipped = json.loads(BLUEPRINT.read_text())
        tab.wait("ed.graph._nodes.length === arg", arg=len(shipped["nodes"]))
        assert_same_workflow_nodes(tab, tab.js("ed.workflow().nodes"), shipped["nodes"])


def _png_with_workflow(workflow: dict) -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps(workflow))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 120, 200)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def rename_ids(workflow: dict, names: dict[str, str]) -> dict:
    """The same workflow with node ids replaced (links and layout follow)."""
    text = json.dumps(workflow)
    doc = json.loads(text)
    doc["nodes"] = {names.get(k, k): v for k, v in doc["nodes"].items()}
    for node in doc["nodes"].values():
        for value in node["inputs"].values():
            if isinstance(value, dict) and "from" in value:
                value["from"][0] = names.get(value["from"][0], value["from"][0])
    doc["layout"]["nodes"] = {names.get(k, k): v for k, v in doc["layout"]["nodes"].items()}
    return doc


def test_drop_png_restores_its_workflow(tab: BrowserPage):
    new_canvas(tab)
    ids = build_core_graph(tab)
    original = tab.js("ed.workflow()")
    new_canvas(tab)
    drop_file(tab, _png_with_workflow(original), "from-disk.png", "image/png")
    tab.wait("ed.graph._nodes.length === arg", arg=len(ids))
    restored = tab.js("ed.workflow()")
    assert restored["nodes"] == original["nodes"]
    tab.shot("07_png_dropped")

    # named ids survive a round trip; an id that is not a plain name is renumbered, links intact
    hostile = "<img src=x onerror=window.__pwned=1>"
    named = rename_ids(original, {ids["seed"]: "seed", ids["math"]: "math.1", ids["preview"]: hostile})
    new_canvas(tab)
    drop_file(tab, _png_with_workflow(named), "named.png", "image/png")
    tab.wait("ed.graph._nodes.length === arg", arg=len(ids))
    again = tab.js("ed.workflow()")["nodes"]
    assert again["seed"] == named["nodes"]["seed"] and again["math.1"] == named["nodes"]["math.1"]
    assert hostile not in again
    (renumbered,) = set(again) - set(named["nodes"])
    assert again[renumbered] == named["nodes"][hostile]
    assert not tab.js("window.__pwned ?? false")


def test_editing_keys_delete_undo_redo_bypass_copy_paste_group(tab: BrowserPage):
    new_canvas(tab)
    ids = build_core_graph(tab)
    page = tab.page
    title = tab.js("ed.titleClientPos(arg)", ids["math"])
    page.mouse.click(*title)
    page.keyboard.press("Delete")
    tab.wait("ed.graph._nodes.length === 4")
    page.keyboard.press("Control+z")
    tab.wait("ed.graph._nodes.length === 5 && ed.graph.links.size === 3")
    page.keyboard.press("Control+Shift+z")
    tab.wait("ed.graph._nodes.length === 4")
    page.keyboard.press("Control+z")
    tab.wait("ed.graph._nodes.length === 5")

    title = tab.js("ed.titleClientPos(arg)", ids["math"])
    page.wait_for_timeout(400)  # two clicks on one spot within litegraph's double-click time rename the node
    page.mouse.click(*title)
    page.keyboard.press("Control+b")
    tab.wait("ed.nodeInfo(arg).bypass", arg=ids["math"])
    assert tab.js("ed.workflow().nodes[arg].bypass", ids["math"]) is True
    page.keyboard.press("Control+c")
    page.mouse.move(title[0] + 40, title[1] + 260)
    page.keyboard.press("Control+v")
    tab.wait("ed.graph._nodes.length === 6")
    page.mouse.click(*tab.js("ed.titleClientPos(arg)", ids["seed"]))
    page.keyboard.press("Control+g")
    tab.wait("ed.workflow().layout.groups.length === 1")
    tab.shot("08_edit_keys")


def test_double_click_search_adds_a_node(tab: BrowserPage):
    new_canvas(tab)
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    tab.page.mouse.dblclick(rect[0] + 400, rect[1] + 300)
    tab.page.wait_for_selector('[data-testid="search-popup"]', state="visible")
    tab.page.keyboard.type("math int")
    tab.shot("09_search")
    tab.page.keyboard.press("Enter")
    tab.wait("ed.nodesOfType('MathInt').length === 1")


def test_a_slow_double_click_still_opens_the_search(tab: BrowserPage):
    """The browser's own double-click (the OS setting, often 500 ms) opens the search, not only
    litegraph's 300 ms timer: on a loaded machine the two presses of even a fast double-click can
    arrive further apart than that (this is how test_double_click_search_adds_a_node flaked)."""
    new_canvas(tab)
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    tab.page.mouse.move(rect[0] + 420, rect[1] + 320)
    tab.page.mouse.down(click_count=1)
    tab.page.mouse.up(click_count=1)
    time.sleep(0.4)
    tab.page.mouse.down(click_count=2)
    tab.page.mouse.up(click_count=2)
    tab.page.wait_for_selector('[data-testid="search-popup"]', state="visible", timeout=5000)
    tab.page.keyboard.press("Escape")


def test_progress_goes_to_the_tab_that_queued(tab: BrowserPage, browser):
    other_context = browser.new_context(viewport=VIEWPORT)
    other = BrowserPage(other_context, tab.server)
    try:
        other.open()
        other.wait("ed.statusEl.classList.contains('ok')", timeout=10)
        new_canvas(tab)
        build_core_graph(tab)
        tab.wait("ed.statusEl.classList.contains('ok')", timeout=10)
        run_id = click_run(tab)
        wait_run_done(tab, run_id)
        time.sleep(0.3)
        assert not other.js("ed.eventLog.filter(e => e.run_id === arg && e.type.startsWith('node_')).length", run_id)
        # the other tab still sees the run in its queue panel
        other.js("ed.refreshQueue()")
        row = other.page.locator(f'[data-testid="run"][data-run="{run_id}"]')
        row.wait_for()
        # ... and can load the workflow that run used
        row.locator("button", has_text="Load").click()
        other.wait("Object.keys(ed.workflow().nodes).length === arg", arg=len(tab.js("ed.workflow().nodes")))
        assert other.js("ed.workflow().nodes") == tab.js("ed.workflow().nodes")
    finally:
        other_context.close()


def test_export_then_import_json_and_upload_an_image(tab: BrowserPage):
    new_canvas(tab)
    ids = build_core_graph(tab)
    with tab.page.expect_download() as download_info:
        tab.page.click('[data-testid="btn-export"]')
    exported = json.loads(Path(download_info.value.path()).read_text())
    assert exported["format"] == "ditgraph/workflow"
    assert exported["nodes"] == tab.js("ed.workflow().nodes")
    new_canvas(tab)
    with tab.page.expect_file_chooser() as chooser_info:
        tab.page.click('[data-testid="btn-import"]')
    chooser_info.value.set_files(files=[{"name": "flow.json", "mimeType": "application/json",
                                         "buffer": json.dumps(exported).encode()}])
    tab.wait("ed.graph._nodes.length === arg", arg=len(ids))
    assert tab.js("ed.workflow().nodes") == exported["nodes"]

    # LoadImage: the upload button stores the picked image in the server's input folder
    if "LoadImage" not in {d["type"] for d in tab.js("ed.catalogue")}:
        return
    rect = tab.js("(() => { const r = ed.canvasEl.getBoundingClientRect(); return [r.left, r.top]; })()")
    loader = tab.drag_from_palette("LoadImage", (rect[0] + 300, rect[1] + 560))
    png = _png_with_workflow({"format": "none"})
    with tab.page.expect_file_chooser() as chooser_info:
        tab.page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'image__upload', 0)", loader))
    chooser_info.value.set_files(files=[{"name": "blue.png", "mimeType": "image/png", "buffer": png}])
    name = tab.wait("ed.nodeInfo(arg).widgets.image", arg=loader)
    assert (tab.server.root / "input" / name).is_file()
    tab.wait("ed.nodeInfo(arg).images === 1", arg=loader)
    tab.shot("10_uploaded_image")

    # an image without a workflow dropped onto the Load Image node is uploaded into it
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 40, 40)).save(buffer, "PNG")
    at = tab.js("ed.graphToClient(ed.graph.getNodeById(Number(arg)).pos[0] + 60, ed.graph.getNodeById(Number(arg)).pos[1] + 10)", loader)
    drop_file(tab, buffer.getvalue(), "red.png", "image/png", at=at)
    tab.wait("ed.nodeInfo(arg[0]).widgets.image !== arg[1]", arg=[loader, name])
    assert tab.js("ed.graph._nodes.length") == len(ids) + 1
