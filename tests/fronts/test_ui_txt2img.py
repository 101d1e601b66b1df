"""The txt2img flow in a real browser: build the shipped shapes-dit graph from an empty canvas
with the mouse, run it, re-run with a new seed, and restore the workflow from the output PNG.

The shipped graphs/shapes-txt2img.json is the blueprint (node types, positions, wires); the
test places and wires every node itself. Screenshots go to test-artifacts/ui/.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.fixtures.ui_helpers import (
    REPO,
    BrowserPage,
    browser_skip_reason,
    click_run,
    drop_file,
    editor_tab,
    new_canvas,
    wait_run_done,
)

BLUEPRINT_PATH = REPO / "graphs" / "shapes-txt2img.json"
PROMPT = "a small green triangle at the bottom right on a white background"
STEPS = 4  # typed into the Sampler's steps widget: keeps the CPU run short

pytestmark = [
    pytest.mark.skipif(browser_skip_reason() is not None, reason=browser_skip_reason() or ""),
    pytest.mark.skipif(not BLUEPRINT_PATH.is_file(), reason="graphs/shapes-txt2img.json is not shipped yet"),
]


def is_link(value) -> bool:
    return isinstance(value, dict) and "from" in value


@pytest.fixture(scope="module")
def flow():
    """One tab kept across the tests of this module (they continue each other's work)."""
    with editor_tab("ditgraph-ui-txt2img-") as tab:
        yield {"tab": tab, "blueprint": json.loads(BLUEPRINT_PATH.read_text())}


def test_build_txt2img_with_the_mouse_and_run(flow):
    tab: BrowserPage = flow["tab"]
    blueprint = flow["blueprint"]
    catalogue = {d["type"] for d in tab.js("ed.catalogue")}
    missing = {n["type"] for n in blueprint["nodes"].values()} - catalogue
    if missing:
        pytest.skip(f"the server does not offer these nodes yet: {sorted(missing)}")
    new_canvas(tab)
    # zoom out so the whole blueprint fits on the canvas
    tab.js("(ed.canvas.ds.scale = 0.45, ed.canvas.ds.offset = [30, 80], ed.canvas.setDirty(true, true), 0)")
    ids: dict[str, str] = {}
    for bid, node in blueprint["nodes"].items():
        x, y = blueprint["layout"]["nodes"][bid]["pos"]
        ids[bid] = tab.drag_from_palette(node["type"], tab.js("ed.graphToClient(arg[0], arg[1])", [x, y]))
    tab.shot("20_txt2img_nodes_placed")
    wires = 0
    for bid, node in blueprint["nodes"].items():
        for name, value in node["inputs"].items():
            if is_link(value):
                source, output = value["from"]
                tab.connect(ids[str(source)], output, ids[bid], name)
                wires += 1
                tab.wait("ed.graph.links.size === arg", arg=wires, timeout=5)
    tab.js("ed.fitNodes(Object.keys(ed.workflow().nodes), 0.62)")
    tab.shot("21_txt2img_wired")
    tab.js("(ed.canvas.ds.scale = 0.45, ed.canvas.ds.offset = [30, 80], ed.canvas.draw(true, true), 0)")

    # the prompt: click the multi-line widget, type into the overlay, click away
    prompt_id = next(ids[b] for b, n in blueprint["nodes"].items() if n["type"] == "TextEncode")
    tab.page.mouse.click(*tab.js("ed.widgetClientPos(arg, 'text')", prompt_id))
    editor = tab.page.locator('[data-testid="text-editor"]')
    editor.wait_for()
    editor.fill("")
    tab.page.keyboard.type(PROMPT)
    tab.shot("22_txt2img_prompt_editing")
    tab.page.mouse.click(*tab.js("ed.graphToClient(arg[0], arg[1])", [300, 1100]))
    tab.wait("ed.nodeInfo(arg[0]).widgets.text === arg[1]", arg=[prompt_id, PROMPT])

    # steps: click the middle of the number widget, type the value into litegraph's prompt
    sampler_id = next(ids[b] for b, n in blueprint["nodes"].items() if n["type"] == "Sampler")
    tab.page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'steps', 0)", sampler_id))
    box = tab.page.locator(".graphdialog input")
    box.wait_for()
    box.fill(str(STEPS))
    box.press("Enter")
    tab.wait("ed.nodeInfo(arg[0]).widgets.steps === arg[1]", arg=[sampler_id, STEPS])

    # every other widget value the blueprint sets differently from the node defaults
    built = tab.js("ed.workflow()")
    for bid, node in blueprint["nodes"].items():
        for name, value in node["inputs"].items():
            if is_link(value) or name in ("text", "steps") and node["type"] in ("TextEncode", "Sampler"):
                continue
            if built["nodes"][ids[bid]]["inputs"].get(name) != value:
                tab.js("(() => { const n = ed.graph.getNodeById(Number(arg[0])); n.widgets.find(w => w.name === arg[1]).value = arg[2]; ed.changed('test'); })()",
                       [ids[bid], name, value])
    built = tab.js("ed.workflow()")
    for bid, node in blueprint["nodes"].items():
        mine = built["nodes"][ids[bid]]
        assert mine["type"] == node["type"]
        for name, value in node["inputs"].items():
            if is_link(value):
                assert mine["inputs"][name] == {"from": [ids[str(value["from"][0])], value["from"][1]]}, (bid, name)
    flow["ids"] = ids
    flow["sampler"] = sampler_id
    flow["save"] = next(ids[b] for b, n in blueprint["nodes"].items() if n["type"] == "SaveImage")

    run_id = click_run(tab)
    tab.wait("ed.nodeInfo(arg).runState === 'running'", arg=sampler_id, timeout=120)
    tab.js("ed.fitNodes(arg)", [sampler_id, flow["save"]])
    # a latent preview from the progress events is drawn on the sampler while it runs
    tab.wait("ed.graph.getNodeById(Number(arg)).previewImage !== null || ed.nodeInfo(arg).runState === 'done'",
             arg=sampler_id, timeout=120)
    tab.shot("23_txt2img_running_latent_preview")
    wait_run_done(tab, run_id, timeout=240)
    tab.wait("ed.nodeInfo(arg).images > 0", arg=flow["save"], timeout=20)
    progress = tab.js("ed.eventLog.filter(e => e.type === 'progress' && e.node === arg)", sampler_id)
    assert progress and progress[-1]["step"] == progress[-1]["total"] == STEPS
    # previews are rate-limited (nodes/sampling.py: one per PREVIEW_INTERVAL, plus the last step)
    assert progress[-1].get("preview"), "the last progress event should carry a latent preview"
    tab.js("ed.fitNodes(arg)", [sampler_id, flow["save"]])
    tab.shot("24_txt2img_image_on_save_node")
    flow["workflow"] = tab.js("ed.workflow()")
    flow["image_url"] = tab.js("ed.nodeInfo(arg).imageUrls[0]", flow["save"])

    # double-clicking the image opens it large
    body = tab.js("(() => { const n = ed.graph.getNodeById(Number(arg)); return ed.graphToClient(n.pos[0] + n.size[0] / 2, n.pos[1] + n.size[1] - 40); })()",
                  flow["save"])
    tab.page.mouse.dblclick(*body)
    lightbox = tab.page.locator('[data-testid="lightbox"] img')
    lightbox.wait_for()
    tab.page.wait_for_function("document.querySelector('[data-testid=\"lightbox\"] img').naturalWidth > 0")
    tab.shot("24b_txt2img_lightbox")
    tab.page.click('[data-testid="lightbox"]', position={"x": 5, "y": 5})
    lightbox.wait_for(state="detached")
    # a slow double-click (400 ms apart: within the OS double-click time, past litegraph's 300 ms) too
    tab.page.mouse.move(*body)
    tab.page.mouse.down(click_count=1)
    tab.page.mouse.up(click_count=1)
    time.sleep(0.4)
    tab.page.mouse.down(click_count=2)
    tab.page.mouse.up(click_count=2)
    lightbox.wait_for()
    tab.page.click('[data-testid="lightbox"]', position={"x": 5, "y": 5})
    lightbox.wait_for(state="detached")


def test_new_seed_reruns_only_sampler_and_what_follows(flow):
    if "sampler" not in flow:
        pytest.skip("the txt2img graph was not built")
    tab: BrowserPage = flow["tab"]
    sampler = flow["sampler"]
    tab.js("(ed.canvas.ds.scale = 0.45, ed.canvas.ds.offset = [30, 80], ed.canvas.setDirty(true, true), 0)")
    tab.page.wait_for_timeout(100)
    tab.page.mouse.click(*tab.js("ed.widgetArrowClientPos(arg, 'seed', 1)", sampler))
    tab.wait("ed.nodeInfo(arg).widgets.seed === 1", arg=sampler)
    run_id = click_run(tab)
    done = wait_run_done(tab, run_id, timeout=240)
    workflow = tab.js("ed.workflow()")
    downstream = {sampler}
    changed = True
    while changed:  # the sampler and every node fed by it, directly or not
        changed = False
        for nid, node in workflow["nodes"].items():
            if nid not in downstream and any(is_link(v) and v["from"][0] in downstream for v in node["inputs"].values()):
                downstream.add(nid)
                changed = True
    assert set(done["executed"]) == downstream
    assert set(done["cached"]) == set(workflow["nodes"]) - downstream
    tab.wait("ed.nodeInfo(arg).images > 0", arg=flow["save"], timeout=20)
    assert tab.js("ed.nodeInfo(arg).runState", flow["ids"]["1"]) == "cached"
    tab.js("ed.fitNodes(Object.keys(ed.workflow().nodes), 0.62)")
    tab.shot("25_txt2img_reseeded_cached_states")
    flow["workflow"] = workflow
    flow["image_url"] = tab.js("ed.nodeInfo(arg).imageUrls[0]", flow["save"])


def test_dropping_the_output_png_restores_its_workflow(flow):
    if "image_url" not in flow:
        pytest.skip("no output image to drop")
    tab: BrowserPage = flow["tab"]
    png = tab.server.get_bytes(flow["image_url"])
    assert png.startswith(b"\x89PNG")
    new_canvas(tab)
    drop_file(tab, png, "shapes.png", "image/png")
    tab.wait("ed.graph._nodes.length === arg", arg=len(flow["workflow"]["nodes"]))
    restored = tab.js("ed.workflow()")
    assert restored["nodes"] == flow["workflow"]["nodes"]
    tab.shot("26_txt2img_restored_from_png")


def test_preview_node_added_by_mouse_shows_its_image(flow):
    if "image_url" not in flow:
        pytest.skip("the txt2img graph did not run")
    tab: BrowserPage = flow["tab"]
    blueprint = flow["blueprint"]
    decode = next(flow["ids"][b] for b, n in blueprint["nodes"].items() if n["type"] == "VAEDecode")
    tab.js("ed.fitNodes(arg)", [decode, flow["save"]])
    at = tab.js("(() => { const n = ed.graph.getNodeById(Number(arg)); return ed.graphToClient(n.pos[0], n.pos[1] + n.size[1] + 80); })()", decode)
    preview = tab.drag_from_palette("PreviewImage", at)
    tab.connect(decode, "image", preview, "images")
    tab.wait("ed.workflow().nodes[arg[0]].inputs.images?.from?.[0] === arg[1]", arg=[preview, decode])
    run_id = click_run(tab)
    done = wait_run_done(tab, run_id, timeout=240)
    assert done["executed"] == [preview]  # everything else is a cache hit
    tab.wait("ed.nodeInfo(arg).images > 0", arg=preview, timeout=20)
    tab.shot("27_txt2img_preview_node")


def test_cancel_stops_a_running_sampler(flow):
    if "sampler" not in flow:
        pytest.skip("the txt2img graph was not built")
    tab: BrowserPage = flow["tab"]
    sampler = flow["sampler"]
    tab.js("(() => { const n = ed.graph.getNodeById(Number(arg)); n.widgets.find(w => w.name === 'steps').value = 200; ed.changed('test'); })()", sampler)
    run_id = click_run(tab)
    tab.wait("ed.eventLog.some(e => e.type === 'progress' && e.run_id === arg)", arg=run_id, timeout=120)
    tab.page.click('[data-testid="btn-cancel"]')
    tab.wait("ed.eventLog.some(e => e.type === 'run_cancelled' && e.run_id === arg)", arg=run_id, timeout=60)
    steps = tab.js("ed.eventLog.filter(e => e.type === 'progress' && e.run_id === arg).length", run_id)
    assert steps < 200
    assert tab.js("ed.nodeInfo(arg).runState", sampler) is None and tab.js("ed.nodeInfo(arg).progress", sampler) is None
    tab.page.wait_for_selector(f'[data-testid="run"][data-run="{run_id}"][data-status="cancelled"]')
    tab.shot("28_txt2img_cancelled")
