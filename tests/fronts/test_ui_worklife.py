"""Browser tests of the editor's "never lose work" promises, history, settings and the mask editor.

Real ``ditgraph serve`` + Debian Chromium (see tests/fixtures/ui_helpers.py); every wait is
on a condition, never a sleep. Screenshots go to test-artifacts/ui/.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.fixtures.ui_helpers import BrowserPage, browser_fixture, browser_skip_reason, server_fixture, tab_fixture  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or "")

# RectangleMask -> MaskToImage -> SaveImage: an image in a second, no model needed
MASK_IMAGE = {
    "format": "ditgraph/workflow", "version": 1, "meta": {"name": "mask-image"}, "layout": {},
    "nodes": {
        "1": {"type": "RectangleMask", "inputs": {"x": 8, "y": 8, "box_width": 24, "box_height": 16, "width": 64, "height": 64}},
        "2": {"type": "MaskToImage", "inputs": {"mask": {"from": ["1", "mask"]}}},
        "3": {"type": "SaveImage", "inputs": {"images": {"from": ["2", "image"]}, "filename_prefix": "ui-mask"}},
    },
}


def run_and_wait(tab: BrowserPage, timeout: float = 180) -> str:
    before = tab.js("ed.lastRunId ?? null")
    tab.page.click('[data-testid="btn-run"]')
    run_id = tab.wait("ed.lastRunId && ed.lastRunId !== arg && ed.lastRunId", arg=before)
    event = tab.wait("ed.eventLog.find(e => e.run_id === arg && ['run_finished', 'run_failed'].includes(e.type))",
                     timeout=timeout, arg=run_id)
    assert event["type"] == "run_finished", event
    return run_id


def test_undo_keeps_previews_and_history_shows_thumbnails(tab: BrowserPage):
    tab.js("ed.openDocument(arg)", MASK_IMAGE)
    tab.wait("ed.tab.title === 'mask-image' && ed.graph._nodes.length === 3")
    run_id = run_and_wait(tab)
    tab.wait("ed.nodeInfo('3').images === 1")
    row = tab.page.wait_for_selector(f'[data-testid="run"][data-run="{run_id}"][data-status="success"]')
    assert "mask-image" in row.inner_text() and row.inner_text().rstrip().endswith(("s", "Load"))
    assert " s" in row.query_selector('[data-testid="run-meta"]').inner_text()  # when, and how long it took
    tab.page.mouse.click(*tab.js("ed.titleClientPos('3')"))
    tab.page.keyboard.press("Delete")
    tab.wait("ed.nodeInfo('3') === null")
    tab.page.keyboard.press("Control+z")
    tab.wait("ed.nodeInfo('3') !== null && ed.nodeInfo('3').images === 1")  # the image came back with the node
    tab.page.keyboard.press("Control+Shift+z")
    tab.wait("ed.nodeInfo('3') === null")
    tab.page.keyboard.press("Control+z")
    tab.wait("ed.nodeInfo('3') && ed.nodeInfo('3').images === 1")
    tab.shot("life_01_undo_keeps_image")

    tab.page.click('[data-testid="btn-history"]')
    tab.page.wait_for_selector('[data-testid="history-run"]')
    tab.page.select_option('[data-testid="history-filter"]', "mask-image")
    tab.wait("document.querySelector('[data-testid=history-list]').dataset.loaded === 'mask-image'")
    cards = tab.page.locator('[data-testid="history-run"]')
    assert cards.count() == 1
    tab.wait("[...document.querySelectorAll('[data-testid=history-thumb]')].some(i => i.complete && i.naturalWidth > 0)")
    assert "seed" not in cards.first.inner_text()  # this workflow has no seed; times and duration are shown
    tab.shot("life_02_history")
    tab.page.click('[data-testid="history-delete"]')
    tab.wait("document.querySelectorAll('[data-testid=history-run]').length === 0")
    tab.page.keyboard.press("Escape")
    tab.wait("!document.querySelector('[data-testid=history]')")


def test_new_and_open_keep_edits_and_a_dirty_tab_asks(tab: BrowserPage):
    page = tab.page
    first = tab.wait("ed.tab.id")
    tab.js("(ed.graph.getNodeById(5).widgets.find(w => w.name === 'steps').value = 3, ed.changed('test'), 0)")
    tab.wait("document.querySelector('[data-testid=tab][data-dirty=\"1\"]')")
    page.click('[data-testid="btn-new"]')
    tab.wait("ed.tabs.list.length === 2 && ed.graph._nodes.length === 0")
    page.click(f'[data-testid="tab"][data-tab="{first}"]')
    tab.wait("ed.tab.id === arg && ed.nodeInfo('5').widgets.steps === 3", arg=first)  # the edit is still there
    page.keyboard.press("Control+z")
    tab.wait("ed.nodeInfo('5').widgets.steps === 28")  # this tab's own history
    page.keyboard.press("Control+Shift+z")
    tab.wait("ed.nodeInfo('5').widgets.steps === 3")

    page.click(f'[data-testid="tab"][data-tab="{first}"] [data-testid="tab-close"]')
    page.wait_for_selector('[data-testid="choice-dialog"]')
    tab.shot("life_03_dirty_tab_asks")
    page.click('[data-testid="choice-cancel"]')
    assert tab.js("ed.tabs.list.length") == 2
    # autosaved: a reload brings both tabs back, the edit and its dirty marker included
    tab.wait("ed.tabs.list.every(t => t.autosaved)")
    page.reload()
    page.wait_for_selector('.dg-root[data-ready="1"]')
    tab.wait("ed.tabs.list.length === 2")
    page.click(f'[data-testid="tab"][data-tab="{first}"]')
    tab.wait("ed.tab.id === arg && ed.nodeInfo('5').widgets.steps === 3 && ed.dirty", arg=first)
    page.click(f'[data-testid="tab"][data-tab="{first}"] [data-testid="tab-close"]')
    page.click('[data-testid="choice-discard"]')
    tab.wait("ed.tabs.list.length === 1 && ed.tab.id !== arg", arg=first)


def test_reload_mid_run_shows_the_finished_image(tab: BrowserPage):
    tab.js("(ed.graph.getNodeById(5).widgets.find(w => w.name === 'steps').value = 12, ed.changed('test'), 0)")
    tab.page.click('[data-testid="btn-run"]')
    run_id = tab.wait("ed.lastRunId")
    tab.wait("ed.eventLog.some(e => e.run_id === arg && e.type === 'node_started')", arg=run_id, timeout=120)
    finished_before_reload = tab.js("ed.eventLog.some(e => e.run_id === arg && e.type === 'run_finished')", run_id)
    tab.page.reload()
    tab.page.wait_for_selector('.dg-root[data-ready="1"]')
    assert tab.js("ed.runs.has(arg)", run_id)  # the page follows its run again
    tab.wait("ed.nodeInfo('7').images === 1", timeout=180)
    assert tab.js("ed.nodeInfo('7').imageUrls[0]").startswith("/api/outputs/")
    tab.shot("life_04_reload_mid_run")
    print("run finished before the reload:", finished_before_reload)


def test_reroutes_are_not_offered_and_escape_closes_things(tab: BrowserPage):
    page = tab.page
    tab.js("""(() => { const n = ed.graph.getNodeById(1);
        const e = Object.assign(new MouseEvent('pointerup', {clientX: 400, clientY: 300}), {canvasX: 0, canvasY: 0});
        ed.canvas.showConnectionMenu({nodeFrom: n, slotFrom: n.outputs[0], e}); return 0; })()""")
    menu = page.wait_for_selector(".litecontextmenu")
    assert "Add Node" in menu.inner_text() and "Reroute" not in menu.inner_text()
    openers = [(lambda: None, ".litecontextmenu"), (lambda: page.keyboard.press("?"), '[data-testid="shortcuts"]'),
               (lambda: tab.js("(ed.showImages(['/api/inputs/none.png']), 0)"), '[data-testid="lightbox"]')]
    for open_it, selector in openers:  # Escape closes menus, the shortcut sheet and the lightbox
        open_it()
        page.wait_for_selector(selector)
        page.keyboard.press("Escape")
        page.wait_for_selector(selector, state="detached")


def test_width_100_is_refused_by_validate_and_run(tab: BrowserPage):
    assert tab.js("ed.graph.getNodeById(4).widgets.find(w => w.name === 'width').options.step2") == 16
    tab.js("(ed.graph.getNodeById(4).widgets.find(w => w.name === 'width').value = 100, ed.changed('test'), 0)")
    tab.page.click('[data-testid="btn-validate"]')
    problem = tab.page.wait_for_selector('[data-testid="problem"][data-node="4"][data-input="width"]')
    assert "multiple of 16" in problem.inner_text()
    tab.page.click('[data-testid="btn-run"]')
    tab.page.wait_for_selector('[data-testid="toast-error"]:has-text("Not queued")')


def test_settings_theme_and_run_options(tab: BrowserPage):
    page = tab.page
    page.click('[data-testid="btn-settings"]')
    page.select_option('[data-testid="setting-theme"]', "light")
    tab.wait("ed.app.classList.contains('dg-light') && ed.canvas.clear_background_color === '#eef0f3'")
    page.select_option('[data-testid="setting-cache_policy"]', "minimal")
    page.fill('[data-testid="setting-vram_budget_gb"]', "6")
    page.keyboard.press("Tab")
    tab.shot("life_05_settings_light")
    page.keyboard.press("Escape")
    with page.expect_request(lambda r: r.url.endswith("/api/runs") and r.method == "POST") as request_info:
        page.click('[data-testid="btn-run"]')
    options = json.loads(request_info.value.post_data)["options"]
    assert options == {"cache_policy": "minimal", "preview_method": "auto", "vram_budget_gb": 6}
    page.reload()
    page.wait_for_selector('.dg-root[data-ready="1"]')
    assert tab.js("ed.app.classList.contains('dg-light')")  # remembered


def _png(size=128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (250, 250, 250)).save(buffer, "PNG")
    return buffer.getvalue()


def test_paint_a_mask_and_inpaint_with_it(tab: BrowserPage):
    page = tab.page
    tab.js("ed.openExample('edit-inpaint')")
    tab.wait("ed.graph._nodes.length === 14 && ed.nodesOfType('Inpaint').length === 1")
    for node in (5, 10):  # fewer steps: the test is about the mask
        tab.js(f"(ed.graph.getNodeById({node}).widgets.find(w => w.name === 'steps').value = 3, 0)")
    loader = tab.js("String(ed.addNode('LoadImage', [0, 1200]).id)")
    tab.js("ed.fitNodes([arg], 1)", loader)
    with page.expect_file_chooser() as chooser:
        page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'image__upload', 0)", loader))
    chooser.value.set_files(files=[{"name": "white.png", "mimeType": "image/png", "buffer": _png()}])
    source = tab.wait("ed.nodeInfo(arg).widgets.image", arg=loader)
    tab.wait("ed.nodeInfo(arg).images === 1", arg=loader)  # Load Image shows its file

    page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'image__mask', 0)", loader))
    page.wait_for_selector('[data-testid="mask-editor"]')
    page.click('[data-testid="mask-tool-rect"]')
    box = page.locator(".dg-mask-stage").bounding_box()
    at = lambda fx, fy: (box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)  # noqa: E731
    tab.drag(at(0.05, 0.05), at(0.45, 0.45))
    page.click('[data-testid="mask-tool-paint"]')
    tab.drag(at(0.8, 0.8), at(0.9, 0.9))
    tab.shot("life_06_mask_editor")
    page.click('[data-testid="mask-save"]')
    masked = tab.wait("ed.nodeInfo(arg[0]).widgets.image !== arg[1] && ed.nodeInfo(arg[0]).widgets.image", arg=[loader, source])
    assert "-mask" in masked
    with Image.open(tab.server.root / "input" / masked) as img:
        alpha = img.convert("RGBA").getchannel("A")
        assert alpha.getpixel((32, 32)) == 0  # inside the rectangle: transparent = the area to change
        assert alpha.getpixel((100, 20)) == 255  # untouched
        assert alpha.getpixel((109, 109)) < 128  # the brush stroke

    # the painted mask drives the inpaint: Load Image's image and mask replace the generated source
    tab.js("""(() => { const g = ed.graph, l = g.getNodeById(Number(arg));
        const link = (out, id, inp) => l.connect(l.findOutputSlot(out), g.getNodeById(id), g.getNodeById(id).findInputSlot(inp));
        link('image', 8, 'image'); link('image', 12, 'original'); link('mask', 10, 'mask'); link('mask', 12, 'mask'); return 0; })()""", loader)
    run_id = run_and_wait(tab, timeout=300)
    tab.wait("ed.nodeInfo('21').images === 1", timeout=60)
    record = tab.server.get_json(f"/api/runs/{run_id}")
    assert record["workflow"]["nodes"][loader]["inputs"]["image"] == masked
    assert record["workflow"]["nodes"]["10"]["inputs"]["mask"] == {"from": [loader, "mask"]}
    tab.shot("life_07_inpaint_with_painted_mask")


def test_convert_to_subgraph_undo_and_unpack(tab: BrowserPage):
    page = tab.page
    tab.js("ed.openDocument(arg)", MASK_IMAGE)
    tab.wait("ed.graph._nodes.length === 3")
    tab.js("(ed.canvas.selectNodes([ed.graph.getNodeById(1), ed.graph.getNodeById(2)]), ed.convertToSubgraph(), 0)")
    page.fill('[data-testid="prompt-input"]', "MaskPicture")
    page.keyboard.press("Enter")
    tab.wait("ed.graph._nodes.length === 2")
    doc = tab.js("ed.workflow()")
    (instance,) = [i for i, n in doc["nodes"].items() if n["type"] == "subgraph:MaskPicture"]
    definition = doc["subgraphs"]["MaskPicture"]
    assert doc["version"] == 2 and sorted(definition["nodes"]) == ["1", "2"]
    assert definition["outputs"] == {"image": {"from": ["2", "image"]}}
    assert definition["nodes"]["2"]["inputs"]["mask"] == {"from": ["1", "mask"]}
    assert doc["nodes"]["3"]["inputs"]["images"] == {"from": [instance, "image"]}
    assert tab.js("ed.graph.getNodeById(Number(arg)).outputs[0].type", instance) == "IMAGE"
    tab.shot("life_08_subgraph")
    page.keyboard.press("Control+z")
    tab.wait("ed.graph._nodes.length === 3 && !ed.workflow().subgraphs")
    page.keyboard.press("Control+Shift+z")
    tab.wait("ed.graph._nodes.length === 2 && ed.workflow().subgraphs")
    # open the definition (breadcrumb), edit inside, come back: the instance uses the edit
    tab.js("ed.openSubgraph(ed.graph.getNodeById(Number(arg)))", instance)
    tab.wait("ed.graph._nodes.length === 2 && document.querySelectorAll('[data-testid=crumb]').length === 2")
    tab.js("(ed.graph.getNodeById(1).widgets.find(w => w.name === 'box_width').value = 40, ed.changed('test'), 0)")
    assert tab.js("ed.workflow().subgraphs.MaskPicture.nodes['1'].inputs.box_width") == 40  # autosave/run see it
    assert sorted(tab.js("Object.keys(ed.workflow().nodes)")) == sorted([instance, "3"])
    page.locator('[data-testid="crumb"]').first.click()
    tab.wait("ed.graph._nodes.length === 2 && !ed.tab.stack.length")
    assert tab.js("ed.workflow().subgraphs.MaskPicture.nodes['1'].inputs.box_width") == 40
    tab.js("ed.unpackSubgraph(ed.graph.getNodeById(Number(arg)))", instance)
    tab.wait("ed.graph._nodes.length === 3")
    nodes = tab.js("ed.workflow().nodes")
    by_type = {n["type"]: (i, n) for i, n in nodes.items()}
    rect_id, to_image = by_type["RectangleMask"][0], by_type["MaskToImage"]
    assert to_image[1]["inputs"]["mask"] == {"from": [rect_id, "mask"]}
    assert nodes["3"]["inputs"]["images"] == {"from": [to_image[0], "image"]}
    assert by_type["RectangleMask"][1]["inputs"] == {**MASK_IMAGE["nodes"]["1"]["inputs"], "box_width": 40}
    # a node fed from outside: its input becomes the subgraph's input, and survives open/close
    tab.js("(ed.canvas.selectNodes([ed.nodeById(arg)]), ed.convertToSubgraph(), 0)", to_image[0])
    page.fill('[data-testid="prompt-input"]', "ToImage")
    page.keyboard.press("Enter")
    tab.wait("ed.workflow().subgraphs && ed.workflow().subgraphs.ToImage")
    doc = tab.js("ed.workflow()")
    (outer,) = [i for i, n in doc["nodes"].items() if n["type"] == "subgraph:ToImage"]
    assert doc["nodes"][outer]["inputs"] == {"mask": {"from": [rect_id, "mask"]}}
    assert doc["subgraphs"]["ToImage"]["inputs"] == {"mask": {"type": "MASK"}}
    tab.js("ed.openSubgraph(ed.nodeById(arg))", outer)
    tab.wait("ed.graph._nodes.length === 1 && ed.tab.stack.length === 1")
    tab.js("ed.closeSubgraph()")
    tab.wait("!ed.tab.stack.length")
    assert tab.js("ed.workflow().subgraphs.ToImage.nodes[arg].inputs.mask", to_image[0]) == {"from": ["@in", "mask"]}


def test_load_image_shows_the_file_picked_from_the_list_and_after_reload(tab: BrowserPage):
    import httpx

    page = tab.page
    names = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
        answer = httpx.post(f"{tab.server.url}/api/uploads", files={"file": ("pick.png", buffer.getvalue(), "image/png")})
        names.append(answer.json()["name"])
    page.reload()  # the catalogue lists the input folder as it is now
    page.wait_for_selector('.dg-root[data-ready="1"]')
    loader = tab.js("String(ed.addNode('LoadImage', [0, 0]).id)")
    tab.js("ed.fitNodes([arg], 1)", loader)
    page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'image', 0)", loader))
    page.locator(".litecontextmenu .litemenu-entry", has_text=names[1]).click()
    tab.wait("ed.nodeInfo(arg[0]).widgets.image === arg[1] && ed.nodeInfo(arg[0]).images === 1"
             " && ed.graph.getNodeById(Number(arg[0])).outputImages[0].src.endsWith(arg[1])", arg=[loader, names[1]])
    tab.wait("ed.tab.autosaved && !ed.tabs.timers.size")
    page.reload()
    page.wait_for_selector('.dg-root[data-ready="1"]')
    tab.wait("ed.nodeInfo(arg) && ed.nodeInfo(arg).images === 1", arg=loader)  # shown again after the reload
