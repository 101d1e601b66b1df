// The ditgraph editor application: toolbar, tabs, canvas, editing, validation, keys.
// Mounted by app/fronts/ui/editor_component.js; everything talks to the server through api.js.
// Each concern has its module: tabs.js (open workflows + autosave), history.js (undo),
// runs.js (queue, events, results), draw.js (what is drawn on nodes), files.js (import,
// export, uploads), dialogs.js, gallery.js (history), maskeditor.js, settings.js,
// minimap.js, overlays.js (tooltips, text editor), layout.js (auto layout), convert.js.
import { ContextMenu, LiteGraph, LGraph, LGraphCanvas, LGraphGroup } from "/static/vendor/litegraph/litegraph.es.js";
import { api, EventStream } from "./api.js";
import { FORMAT, graphToWorkflow, nodeByWorkflowId, workflowId, workflowToGraph } from "./convert.js";
import { dialogMethods } from "./dialogs.js";
import { drawMethods } from "./draw.js";
import { fileMethods, inputFileWidget } from "./files.js";
import { galleryMethods } from "./gallery.js";
import { History } from "./history.js";
import { overlaps, tidyLayout } from "./layout.js";
import { maskMethods } from "./maskeditor.js";
import { Minimap } from "./minimap.js";
import { accepts, BYPASS_MODE, installTypeRules, registerCatalogue, TYPE_COLOURS } from "./nodes.js";
import { overlayMethods } from "./overlays.js";
import { el, Palette, SearchPopup } from "./palette.js";
import { clientId, runMethods } from "./runs.js";
import { Settings } from "./settings.js";
import { PREFIX, subgraphMethods } from "./subgraphs.js";
import { Tabs } from "./tabs.js";

const MIN_FIT_SCALE = 0.7; // titles stay >= 11 px tall (16 px font)
const NARROW_SCREEN = 1400; // px: below this (a 1366 px laptop) the side panels start hidden
const emptyWorkflow = () => ({ format: FORMAT, version: 1, nodes: {}, layout: {}, meta: {} });

// litegraph writes menu entries (combo dropdowns: model and input file names) as HTML; a file
// named <img src=x onerror=...> would run script. Entries are text: escape them before it does.
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const addMenuItem = ContextMenu.prototype.addItem;
ContextMenu.prototype.addItem = function (name, value, options) {
  const label = name == null ? name : escapeHtml(name);
  if (!value || typeof value !== "object" || value.title == null) return addMenuItem.call(this, label, value, options);
  const title = value.title;
  value.title = escapeHtml(title);
  try {
    return addMenuItem.call(this, label, value, options);
  } finally {
    value.title = title;
  }
};

function loadCss(href) {
  if (document.querySelector(`link[href="${href}"]`)) return;
  document.head.append(el("link", { rel: "stylesheet", href }));
}

/** Reroutes have no place in the workflow format: litegraph's menus must not offer them. */
function withoutReroutes() {
  const Base = LiteGraph.ContextMenu;
  if (Base.ditgraph) return;
  class ContextMenu extends Base {
    constructor(values, options, ...rest) {
      super(Array.isArray(values) ? values.filter((v) => v !== "Add Reroute") : values, options, ...rest);
    }
  }
  ContextMenu.ditgraph = true;
  LiteGraph.ContextMenu = ContextMenu;
}

class Editor {
  constructor(root, options) {
    this.root = root;
    this.options = options;
    this.clientId = clientId();
    this.accepts = accepts;
    this.problems = []; // from /api/validate or a refused run
    this.showProblems = false; // become live after the first run attempt or Validate
    this.runs = new Map(); // run_id -> {tabId, status} for runs this page queued
    this.loading = false;
    this.modals = [];
    this.eventLog = []; // every websocket event of this page (tests and debugging read it)
    this.settings = new Settings(this);
    this.theme = this.settings.theme;
  }

  // ---------------------------------------------------------------- setup
  async start() {
    const { staticUrl } = this.options;
    loadCss(`${staticUrl}/vendor/litegraph/litegraph.css`);
    loadCss(`${staticUrl}/ditgraph/editor.css`);
    LiteGraph.NODE_TEXT_SIZE = 16; // x 0.7 (the smallest default zoom) = 11.2 px
    withoutReroutes();
    this.tabs = new Tabs(this);
    this.buildDom();
    document.getElementById("dg-splash")?.remove();
    installTypeRules();
    Object.assign(LGraphCanvas.link_type_colors, TYPE_COLOURS);
    LiteGraph.release_link_on_empty_shows_menu = true;
    LiteGraph.middle_click_slot_add_default_node = true;
    try {
      this.catalogue = await api.nodes();
    } catch (error) {
      this.toast(`Cannot load the node catalogue: ${error.message}`, "error");
      this.catalogue = [];
    }
    this.classes = registerCatalogue(this.catalogue, this);
    this.palette.setCatalogue(this.catalogue);
    this.setupCanvas();
    this.events = new EventStream(this.clientId, (e) => this.onEvent(e), (ok) => this.setConnected(ok));
    this.keyHandler = (e) => this.onKey(e);
    window.addEventListener("keydown", this.keyHandler, true);
    // a new user action first commits the previous one (input events can overtake timers)
    this.pointerHandler = () => this.flushChange();
    window.addEventListener("pointerdown", this.pointerHandler, true);
    this.unloadHandler = () => (this.flushChange(), this.tabs.flush());
    window.addEventListener("pagehide", this.unloadHandler);
    this.setupDrop();
    this.setupTooltips();
    await this.loadInitial();
    await this.resumeRuns();
    this.pollTimer = setInterval(() => this.refreshQueue(), 5000);
    this.refreshQueue();
    this.ready = true;
    this.root.dataset.ready = "1";
    document.getElementById("dg-splash")?.remove();
    return this;
  }

  setupCanvas() {
    this.graph = new LGraph();
    this.canvas = new LGraphCanvas(this.canvasEl, this.graph);
    this.canvas.background_image = ""; // no fetch of a grid image
    this.canvas.render_canvas_border = false;
    this.canvas.show_info = false;
    this.canvas.low_quality_zoom_threshold = 0.4;
    this.settings.applyTheme();
    // Double-clicks are the browser's own dblclick, which follows the OS double-click time, not
    // litegraph's 300 ms timer (missed on a busy machine): on empty canvas it opens the search, on
    // a node (not on a widget) its outputs. litegraph still opens the search for a wire dropped
    // on empty space (opts given).
    this.canvas.showSearchBox = (event, opts) => (opts ? this.openSearch(event, opts) : null);
    this.canvasEl.addEventListener("dblclick", (event) => {
      const [x, y] = this.canvas.convertEventToCanvasOffset(event);
      const node = this.graph.getNodeOnPos(x, y);
      if (node) {
        if (!node.getWidgetOnPos(x, y) && node.outputUrls?.length) this.showImages(node.outputUrls);
      } else if (!this.graph.getGroupOnPos(x, y)) {
        this.openSearch(event);
      }
    });
    this.canvas.getExtraMenuOptions = (_c, options) => this.extraCanvasMenu(options);
    this.canvas.onAfterChange = () => this.changed("after_change");
    this.canvas.onNodeMoved = () => this.changed("moved");
    this.graph.onNodeAdded = (node) => this.nodeAdded(node);
    this.graph.onNodeRemoved = () => this.changed("removed");
    this.graph.onAfterChange = () => this.changed("after_change");
    this.patchNodeMenu();
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.canvasWrap);
    this.resize();
    this.minimap = new Minimap(this);
    this.canvasWrap.append(this.minimap.canvas);
  }

  destroy() {
    clearInterval(this.pollTimer);
    this.minimap?.destroy();
    this.events?.close();
    this.resizeObserver?.disconnect();
    window.removeEventListener("keydown", this.keyHandler, true);
    window.removeEventListener("pointerdown", this.pointerHandler, true);
    window.removeEventListener("pagehide", this.unloadHandler);
    this.canvas?.stopRendering?.();
  }

  buildDom() {
    const button = (label, title, onclick, id, cls = "") => el("button", { class: `dg-btn ${cls}`, title, onclick, "data-testid": id }, label);
    this.statusEl = el("span", { class: "dg-conn", title: "Event stream" }, "●");
    this.queueCountEl = el("span", { class: "dg-queue-count", "data-testid": "queue-count" }, "0");
    const toolbar = el(
      "header",
      { class: "dg-toolbar" },
      button("☰", "Show or hide the node palette", () => this.togglePanel("palette"), "btn-toggle-palette"),
      el("span", { class: "dg-brand" }, "ditgraph"),
      button("New", "New empty workflow (in a new tab)", () => this.newWorkflow(), "btn-new"),
      button("Open…", "Open a saved or shipped workflow in a new tab (Ctrl+O)", () => this.openDialog(), "btn-open"),
      button("Save", "Save in your workflows folder (Ctrl+S)", () => this.save(), "btn-save"),
      button("Save as…", "Save under a new name", () => this.save(true), "btn-save-as"),
      button("Rename…", "Rename the saved workflow", () => this.rename(), "btn-rename"),
      button("Export", "Download as a JSON file", () => this.exportJson(), "btn-export"),
      button("Import…", "Open a workflow JSON file or a ditgraph PNG in a new tab", () => this.fileInput.click(), "btn-import"),
      el("span", { class: "dg-sep" }),
      button("↶", "Undo (Ctrl+Z)", () => this.undo(), "btn-undo"),
      button("↷", "Redo (Ctrl+Shift+Z / Ctrl+Y)", () => this.redo(), "btn-redo"),
      button("Validate", "Check the workflow and show problems on the nodes", () => this.validate(true), "btn-validate"),
      el("span", { class: "dg-grow" }),
      button("History", "Finished runs: images, seeds, times; load or delete", () => this.openHistory(), "btn-history"),
      button("⚙", "Settings: theme, cache, VRAM, previews", () => this.settings.open(), "btn-settings"),
      button("?", "Keyboard shortcuts (?)", () => this.showShortcuts(), "btn-shortcuts"),
      this.statusEl,
      button(el("span", {}, "Runs ", this.queueCountEl), "Show or hide the runs panel (queued, running and finished runs) and the problems", () => this.togglePanel("side"), "btn-toggle-side"),
      button("Cancel", "Cancel this page's running and queued runs", () => this.cancelMine(), "btn-cancel", "dg-btn-danger"),
      button("▶ Run", "Run the workflow: it joins the queue and starts when the runs before it are done (Ctrl+Enter)", () => this.run(), "btn-run", "dg-btn-primary"),
    );
    this.fileInput = el("input", { type: "file", accept: ".json,.png,application/json,image/png", style: "display:none" });
    this.fileInput.addEventListener("change", () => {
      const file = this.fileInput.files?.[0];
      if (file) this.importFile(file);
      this.fileInput.value = "";
    });
    const paletteEl = el("aside", { class: "dg-palette", "data-testid": "palette" });
    this.canvasEl = el("canvas", { class: "dg-canvas", tabindex: "1", "data-testid": "canvas" });
    this.overlay = el("div", { class: "dg-overlay" });
    this.canvasWrap = el("main", { class: "dg-canvas-wrap" }, this.canvasEl, this.overlay);
    this.queueList = el("div", { class: "dg-queue-list", "data-testid": "queue-list" });
    this.problemList = el("div", { class: "dg-problem-list", "data-testid": "problems" });
    const runsTitle = el("div", { class: "dg-panel-title" }, "Runs", el("span", { class: "dg-grow" }),
      el("button", { class: "dg-btn dg-btn-small", onclick: () => this.cancelAll(), "data-testid": "btn-cancel-all" }, "Cancel all"));
    const side = el("aside", { class: "dg-side" }, runsTitle, this.queueList, el("div", { class: "dg-panel-title" }, "Problems"), this.problemList);
    this.toastEl = el("div", { class: "dg-toasts" });
    this.crumbs = el("div", { class: "dg-crumbs", "data-testid": "crumbs", style: "display:none" });
    const body = el("div", { class: "dg-body" }, paletteEl, el("div", { class: "dg-center" }, this.tabs.bar, this.crumbs, this.canvasWrap), side);
    this.app = el("div", { class: "dg-app" }, toolbar, body, this.toastEl, this.fileInput);
    this.root.append(this.app);
    const narrow = window.innerWidth < NARROW_SCREEN;
    for (const panel of ["palette", "side"]) {
      const stored = localStorage.getItem(`ditgraph.hide.${panel}`);
      if (stored === "1" || (stored === null && narrow)) this.app.classList.add(`dg-hide-${panel}`);
    }
    this.palette = new Palette(paletteEl, this);
    this.search = new SearchPopup(this);
  }

  togglePanel(panel) {
    const hidden = this.app.classList.toggle(`dg-hide-${panel}`);
    localStorage.setItem(`ditgraph.hide.${panel}`, hidden ? "1" : "0");
    this.resize();
  }

  resize() {
    const rect = this.canvasWrap.getBoundingClientRect();
    this.canvas?.resize(Math.floor(rect.width), Math.floor(rect.height));
  }

  setConnected(ok) {
    this.statusEl.classList.toggle("ok", ok);
    this.statusEl.title = ok ? "Connected to the server's event stream" : "Event stream disconnected (reconnecting)";
  }

  toast(message, kind = "info", ms = 4000) {
    const item = el("div", { class: `dg-toast dg-toast-${kind}`, "data-testid": `toast-${kind}` }, message);
    this.toastEl.append(item);
    setTimeout(() => item.remove(), ms);
  }

  // ---------------------------------------------------------------- nodes on the canvas
  nodeAdded(node) {
    const wid = node.properties?.wid;
    if (wid && this.graph._nodes.some((n) => n !== node && n.properties?.wid === wid)) delete node.properties.wid;
    node.runState = null;
    if (!this.loading) this.showInputPreview(node);
    this.changed("added");
  }

  isOverCanvas(x, y) {
    const rect = this.canvasEl.getBoundingClientRect();
    return x >= rect.left && x <= rect.right && y >= rect.top && y <= rect.bottom;
  }

  clientToGraph(x, y) {
    const rect = this.canvasEl.getBoundingClientRect();
    return this.canvas.ds.convertCanvasToOffset([x - rect.left, y - rect.top]);
  }

  graphToClient(x, y) {
    const rect = this.canvasEl.getBoundingClientRect();
    const [cx, cy] = this.canvas.ds.convertOffsetToCanvas([x, y]);
    return [rect.left + cx, rect.top + cy];
  }

  addNode(type, pos) {
    const node = LiteGraph.createNode(type);
    if (!node) {
      this.toast(`Unknown node type ${type}`, "error");
      return null;
    }
    node.pos = [Math.round(pos[0]), Math.round(pos[1])];
    this.graph.beforeChange?.();
    this.graph.add(node);
    this.graph.afterChange?.();
    this.canvas.selectNode(node);
    this.canvas.setDirty(true, true);
    return node;
  }

  addNodeAtClient(type, x, y) {
    return this.addNode(type, this.clientToGraph(x, y));
  }

  addNodeAtCenter(type) {
    const rect = this.canvasEl.getBoundingClientRect();
    const jitter = (this.graph._nodes.length % 8) * 24;
    return this.addNodeAtClient(type, rect.left + rect.width / 3 + jitter, rect.top + rect.height / 3 + jitter);
  }

  openSearch(event, opts = {}) {
    let filter = null;
    const slot = opts.slot_from;
    if (opts.node_from && slot != null) {
      const out = typeof slot === "number" ? opts.node_from.outputs[slot] : slot;
      const fromNode = opts.node_from;
      filter = {
        outputType: out?.type,
        connect: (node) => {
          const index = node.inputs.findIndex((i) => accepts(i.type, out.type));
          if (index >= 0) fromNode.connect(fromNode.outputs.indexOf(out), node, index);
        },
      };
    } else if (opts.node_to && slot != null) {
      const inp = typeof slot === "number" ? opts.node_to.inputs[slot] : slot;
      const toNode = opts.node_to;
      filter = {
        inputType: inp?.type,
        connect: (node) => {
          const index = node.outputs.findIndex((o) => accepts(inp.type, o.type));
          if (index >= 0) node.connect(index, toNode, toNode.inputs.indexOf(inp));
        },
      };
    }
    this.search.open(event.clientX, event.clientY, filter);
    return this.search.box;
  }

  extraCanvasMenu(options) {
    for (let i = options.length - 1; i >= 0; i--) {
      if (options[i] && /subgraph|reroute/i.test(options[i].content ?? "")) options.splice(i, 1);
    }
    // litegraph appends what this returns
    return [
      null,
      { content: "Add group for selected nodes (Ctrl+G)", callback: () => this.groupSelected() },
      { content: "Convert selected nodes to a subgraph", callback: () => this.convertToSubgraph() },
      { content: "Arrange (auto layout)", callback: () => this.arrange() },
      { content: "Fit view", callback: () => this.fitView() },
    ];
  }

  patchNodeMenu() {
    const original = this.canvas.getNodeMenuOptions.bind(this.canvas);
    // subgraphs and litegraph's other run modes have no place in the workflow format
    const unsupported = (o) => o && /subgraph|^Mode$/i.test(o.content ?? "");
    this.canvas.getNodeMenuOptions = (node) => {
      const options = original(node).filter((o) => !unsupported(o));
      const extra = [
        { content: node.mode === BYPASS_MODE ? "Un-bypass (Ctrl+B)" : "Bypass (Ctrl+B)", callback: () => this.toggleBypass([node]) },
        { content: "Run up to this node", callback: () => this.run([workflowId(node)]) },
      ];
      if (node.type?.startsWith(PREFIX)) {
        extra.push({ content: "Open subgraph", callback: () => this.openSubgraph(node) });
        extra.push({ content: "Unpack subgraph", callback: () => this.unpackSubgraph(node) });
      }
      else extra.push({ content: "Convert selected nodes to a subgraph", callback: () => this.convertToSubgraph(this.selectedNodes().length ? this.selectedNodes() : [node]) });
      const file = inputFileWidget(node);
      if (file && node.outputs?.some((o) => o.type === "MASK")) extra.push({ content: "Paint mask…", callback: () => this.openMaskEditor(node, file) });
      else if (node.outputImages?.length && node.outputUrls?.length) extra.push({ content: "Paint a mask on this image…", callback: () => this.maskOutput(node) });
      options.unshift(...extra, null);
      return options;
    };
  }

  selectedNodes() {
    return Object.values(this.canvas.selected_nodes ?? {});
  }

  toggleBypass(nodes = this.selectedNodes()) {
    if (!nodes.length) return;
    const on = nodes.some((n) => n.mode !== BYPASS_MODE);
    for (const node of nodes) node.mode = on ? BYPASS_MODE : 0;
    this.canvas.setDirty(true, true);
    this.changed("bypass");
  }

  groupSelected() {
    const nodes = this.selectedNodes();
    if (!nodes.length) return;
    const group = new LGraphGroup("Group");
    this.graph.add(group);
    group.resizeTo(nodes, 10);
    this.canvas.setDirty(true, true);
    this.changed("group");
  }

  arrange() {
    tidyLayout(this.graph);
    this.fitView();
    this.changed("arrange");
  }

  // ---------------------------------------------------------------- problems
  isProblemWidget(node, name) {
    return this.problemsFor(node).some((p) => p.input === name && p.severity !== "warning");
  }

  problemsFor(node) {
    if (!this.showProblems || !this.problems.length) return [];
    const id = workflowId(node);
    return this.problems.filter((p) => p.node !== null && p.node !== undefined && String(p.node) === id);
  }

  async validate(show) {
    if (show) this.showProblems = true;
    const token = (this.validateToken = (this.validateToken ?? 0) + 1);
    let problems;
    try {
      problems = (await api.validate(this.workflow())).problems ?? [];
    } catch (error) {
      if (show) this.toast(`Validation failed: ${error.message}`, "error");
      return null;
    }
    if (token !== this.validateToken) return null;
    this.setProblems(problems);
    if (show && !problems.length) this.toast("No problems found", "ok");
    return problems;
  }

  setProblems(problems) {
    this.problems = problems;
    this.renderProblems();
    this.canvas.setDirty(true, true);
  }

  renderProblems() {
    const shown = this.showProblems ? this.problems : [];
    const row = (p) =>
      el(
        "div",
        { class: `dg-problem dg-problem-${p.severity}`, "data-testid": "problem", "data-node": p.node ?? "", "data-input": p.input ?? "", onclick: () => this.focusNode(p.node) },
        el("b", {}, p.node !== null && p.node !== undefined ? this.describeNode(p.node) : "workflow"),
        p.input ? ` · ${p.input}` : "",
        el("div", {}, p.message),
      );
    this.problemList.replaceChildren(
      ...(shown.length ? shown.map(row) : [el("div", { class: "dg-muted" }, this.showProblems ? "No problems." : "Run or Validate to check the workflow.")]),
    );
  }

  describeNode(id) {
    const node = nodeByWorkflowId(this.graph, id);
    return node ? `#${id} ${node.title}` : `#${id}`;
  }

  focusNode(id) {
    const node = id === null || id === undefined ? null : nodeByWorkflowId(this.graph, id);
    if (!node) return;
    this.canvas.centerOnNode(node);
    this.canvas.selectNode(node);
    this.canvas.setDirty(true, true);
  }

  // ---------------------------------------------------------------- tabs, change tracking, undo/redo
  get tab() {
    return this.tabs.active;
  }

  get name() {
    return this.tab?.name ?? null;
  }

  get dirty() {
    return Boolean(this.tab?.dirty);
  }

  workflow() {
    const tab = this.tab;
    const doc = graphToWorkflow(this.graph, { meta: { ...tab.meta, name: tab.title }, canvas: this.canvas });
    return tab.stack?.length ? this.composedWorkflow(doc) : this.withSubgraphs(doc);
  }

  /** What undo compares: the workflow without the viewport (panning is not an edit). */
  snapshot() {
    return JSON.stringify(this.withSubgraphs(graphToWorkflow(this.graph, { meta: this.tab?.meta ?? {} })));
  }

  /** The tab's subgraph definitions go with its workflow (format version 2 when there are any). */
  withSubgraphs(doc) {
    const subgraphs = this.tab?.subgraphs;
    if (subgraphs && Object.keys(subgraphs).length) {
      doc.subgraphs = structuredClone(subgraphs);
      doc.version = Math.max(doc.version, 2);
    }
    return doc;
  }

  changed(reason) {
    if (this.loading) return;
    // one commit per user action: litegraph fires several callbacks for one edit, all in one task
    clearTimeout(this.changeTimer);
    this.changeTimer = setTimeout(() => {
      this.changeTimer = null;
      this.commitChange(reason);
    }, 0);
  }

  commitChange() {
    if (this.loading || !this.graph || !this.tab?.history) return;
    if (this.tab.history.push(this.snapshot())) {
      // the last run's done/cached marks describe the graph as it was: drop them (images stay)
      for (const node of this.graph._nodes) {
        if (node.runState === "done" || node.runState === "cached") node.runState = null;
      }
    }
    this.persist();
    if (this.showProblems) {
      clearTimeout(this.validateTimer);
      this.validateTimer = setTimeout(() => this.validate(false), 250);
    }
  }

  flushChange() {
    if (this.changeTimer) {
      clearTimeout(this.changeTimer);
      this.changeTimer = null;
      this.commitChange();
    }
  }

  /** Autosave the current tab (and refresh its dirty marker). */
  persist() {
    this.tabs.touch(this.tab);
    document.title = `${this.dirty ? "● " : ""}${this.tab?.title ?? "untitled"} — ditgraph`;
  }

  restoreSnapshot(snap) {
    const viewport = { offset: [...this.canvas.ds.offset], scale: this.canvas.ds.scale };
    this.loadGraph(JSON.parse(snap));
    this.canvas.ds.offset = viewport.offset;
    this.canvas.ds.scale = viewport.scale;
    this.afterGraphLoad(this.tab);
    this.persist();
    if (this.showProblems) this.validate(false);
  }

  undo() {
    this.flushChange();
    const snap = this.tab.history.undo();
    if (snap !== null) this.restoreSnapshot(snap);
  }

  redo() {
    this.flushChange();
    const snap = this.tab.history.redo();
    if (snap !== null) this.restoreSnapshot(snap);
  }

  /** Keep what the tab shows now (before another tab is shown). */
  captureTab(tab) {
    this.closeTextEditor(true);
    this.closeAllSubgraphs();
    tab.doc = this.workflow();
  }

  /** Put ``tab`` on the canvas: its graph, viewport, undo history, outputs and live runs. */
  showTab(tab) {
    this.closeTextEditor(false);
    clearTimeout(this.changeTimer);
    this.changeTimer = null;
    tab.stack = []; // a tab is shown from its top level (captureTab closed what was open)
    this.loadGraph(tab.doc);
    this.renderCrumbs();
    if (!tab.history) tab.history = new History(this.snapshot());
    if (tab.restoredDirty) {
      tab.history.saved = null;
      tab.restoredDirty = false;
    }
    this.problems = [];
    this.showProblems = false;
    this.renderProblems();
    if (!tab.doc.layout?.viewport) this.fitView();
    this.afterGraphLoad(tab);
    this.persist();
  }

  /** Outputs, input previews and the run marks of a tab, back on its freshly loaded nodes. */
  afterGraphLoad(tab) {
    this.applyOutputs(tab);
    for (const node of this.graph._nodes) this.showInputPreview(node);
    this.canvas.setDirty(true, true);
  }

  /** Replace the canvas's graph with ``doc`` (no history, no tab change). */
  loadGraph(doc) {
    if (this.tab) this.tab.subgraphs = structuredClone(doc.subgraphs ?? {});
    this.registerSubgraphs(doc.subgraphs);
    this.loading = true;
    let warnings;
    try {
      warnings = workflowToGraph(doc, this.graph, this.canvas);
    } finally {
      this.loading = false;
    }
    for (const node of this.graph._nodes) this.clearRunState(node);
    for (const warning of warnings.slice(0, 3)) this.toast(warning, "warning", 6000);
    // draw now: litegraph hit-tests against bounds computed while drawing
    this.canvas.draw(true, true);
  }

  /** Open ``doc`` in a new tab; false (and a message) if it is not a ditgraph workflow. */
  openDocument(doc, { name = null } = {}) {
    if (!doc || doc.format !== FORMAT) {
      this.toast('Not a ditgraph workflow (its "format" is not ditgraph/workflow)', "error");
      return false;
    }
    this.tabs.open(doc, { name });
    return true;
  }

  /** Replace the current tab's workflow with ``doc`` (a fresh history; used by the benchmark). */
  loadDocument(doc) {
    if (!doc || doc.format !== FORMAT) return false;
    this.tab.doc = doc;
    this.tab.meta = { ...(doc.meta ?? {}) };
    this.tab.outputs = {};
    this.tab.history = null;
    this.showTab(this.tab);
    return true;
  }

  /** Fit ``nodes`` (default: all) into the canvas, between MIN_FIT_SCALE and ``maxScale``;
   * a graph too big for the smallest zoom is shown from its top-left corner (the minimap has the rest). */
  fitView(nodes = this.graph._nodes, maxScale = 1) {
    if (!nodes.length) return;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const rect = this.canvasEl.getBoundingClientRect();
    const fit = Math.min(maxScale, (rect.width - 60) / (x1 - x0), (rect.height - 60) / (y1 - y0));
    const scale = Math.max(Math.min(MIN_FIT_SCALE, maxScale), fit);
    const margin = 30 / scale;
    const ox = fit >= scale ? (rect.width / scale - (x1 - x0)) / 2 - x0 : margin - x0;
    const oy = fit >= scale ? (rect.height / scale - (y1 - y0)) / 2 - y0 : margin - y0;
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset = [ox, oy];
    this.canvas.setDirty(true, true);
  }

  async loadInitial() {
    if (await this.tabs.restore()) return;
    try {
      this.openDocument(await api.getWorkflow(this.options.defaultWorkflow, "shipped"));
    } catch {
      this.newWorkflow();
    }
  }

  newWorkflow() {
    this.tabs.open(emptyWorkflow());
    this.canvas.ds.offset = [0, 0];
    this.canvas.ds.scale = 1;
  }

  async save(asNew = false) {
    this.closeAllSubgraphs(); // what is saved is the whole workflow, and its history is marked saved
    const tab = this.tab;
    let name = tab.name;
    if (!name || asNew) {
      name = await this.ask("Save workflow as", name ?? tab.meta.name ?? "my-workflow");
      if (!name) return;
      const existing = await api.workflows().catch(() => null);
      const taken = (existing?.workflows ?? []).some((w) => w.source === "user" && w.name === name);
      if (taken && (await this.choose(`A workflow named “${name}” exists. Replace it?`, [["cancel", "Cancel"], ["replace", "Replace", "dg-btn-danger"]])) !== "replace") return;
    }
    const doc = this.workflow();
    doc.meta.name = name;
    try {
      await api.putWorkflow(name, doc);
    } catch (error) {
      this.toast(`Save failed: ${error.message}`, "error");
      return;
    }
    tab.meta.name = name;
    tab.name = name;
    tab.history.markSaved(this.snapshot());
    this.persist();
    await this.tabs.autosave(tab);
    this.toast(`Saved “${name}”`, "ok");
  }

  async rename() {
    const tab = this.tab;
    if (!tab.name) {
      this.toast("Save the workflow first; then it can be renamed", "warning");
      return;
    }
    const newName = await this.ask(`Rename “${tab.name}” to`, tab.name);
    if (!newName || newName === tab.name) return;
    try {
      await api.renameWorkflow(tab.name, newName);
    } catch (error) {
      this.toast(`Rename failed: ${error.message}`, "error");
      return;
    }
    tab.meta.name = newName;
    tab.name = newName;
    tab.history.markSaved(this.snapshot());
    this.persist();
    this.toast(`Renamed to “${newName}”`, "ok");
  }

  async openWorkflow(name) {
    const open = this.tabs.list.find((t) => t.name === name);
    if (open) return this.tabs.select(open); // already open: show that tab
    try {
      this.openDocument(await api.getWorkflow(name, "user"), { name });
    } catch (error) {
      this.toast(`Cannot open “${name}”: ${error.message}`, "error");
    }
  }

  async openExample(name) {
    try {
      this.openDocument(await api.getWorkflow(name, "shipped"));
    } catch (error) {
      this.toast(`Cannot open example “${name}”: ${error.message}`, "error");
    }
  }

  // ---------------------------------------------------------------- keyboard
  onKey(e) {
    this.flushChange();
    if (e.key === "Escape" && this.closeTop()) {
      e.preventDefault();
      e.stopPropagation();
      return;
    }
    const target = e.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.isContentEditable)) return;
    if (this.modals.length) return; // keys belong to the dialog
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    const tabAt = (step) => this.tabs.list[(this.tabs.list.indexOf(this.tab) + step + this.tabs.list.length) % this.tabs.list.length];
    const actions = [
      [mod && key === "enter", () => this.run()],
      [mod && key === "z" && !e.shiftKey, () => this.undo()],
      [mod && ((key === "z" && e.shiftKey) || key === "y"), () => this.redo()],
      [mod && key === "s", () => this.save(e.shiftKey)],
      [mod && key === "o", () => this.openDialog()],
      [mod && key === "b", () => this.toggleBypass()],
      [mod && key === "g", () => this.groupSelected()],
      [e.altKey && key === "w", () => this.tabs.close(this.tab)],
      [e.altKey && key === "t", () => this.newWorkflow()],
      [e.altKey && e.key === "ArrowRight", () => this.tabs.select(tabAt(1))],
      [e.altKey && e.key === "ArrowLeft", () => this.tabs.select(tabAt(-1))],
      [!mod && e.key === "?", () => this.showShortcuts()],
    ];
    const action = actions.find(([when]) => when);
    if (!action) return;
    action[1]();
    e.preventDefault();
    e.stopPropagation();
  }

  // ---------------------------------------------------------------- helpers for tests and the benchmark
  slotClientPos(nodeId, isInput, slot) {
    const node = nodeByWorkflowId(this.graph, nodeId) ?? this.graph.getNodeById(nodeId);
    const index = typeof slot === "number" ? slot : isInput ? node.findInputSlot(slot) : node.findOutputSlot(slot);
    const pos = node.getConnectionPos(isInput, index);
    return this.graphToClient(pos[0], pos[1]);
  }

  widgetClientPos(nodeId, name, fx = 0.5) {
    const node = nodeByWorkflowId(this.graph, nodeId) ?? this.graph.getNodeById(nodeId);
    const widget = node.widgets.find((w) => w.name === name);
    const h = widget.computedHeight ? widget.computedHeight - 4 : LiteGraph.NODE_WIDGET_HEIGHT;
    return this.graphToClient(node.pos[0] + node.size[0] * fx, node.pos[1] + widget.y + h / 2);
  }

  /** Client position of a widget's left (-1) or right (+1) arrow, or its middle (0). */
  widgetArrowClientPos(nodeId, name, side = 1) {
    const node = nodeByWorkflowId(this.graph, nodeId) ?? this.graph.getNodeById(nodeId);
    const widget = node.widgets.find((w) => w.name === name);
    const x = side > 0 ? node.size[0] - 24 : side < 0 ? 24 : node.size[0] / 2;
    return this.graphToClient(node.pos[0] + x, node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2);
  }

  fitNodes(ids, maxScale = 1) {
    this.fitView(ids.map((id) => nodeByWorkflowId(this.graph, id)).filter(Boolean), maxScale);
    this.canvas.draw(true, true);
  }

  titleClientPos(nodeId) {
    const node = nodeByWorkflowId(this.graph, nodeId) ?? this.graph.getNodeById(nodeId);
    return this.graphToClient(node.pos[0] + 40, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2);
  }

  /** The node of a workflow id (numeric or named). */
  nodeById(id) {
    return nodeByWorkflowId(this.graph, id);
  }

  nodesOfType(type) {
    return this.graph._nodes.filter((n) => n.type === type).map((n) => workflowId(n));
  }

  /** Readability of what is on screen: title size in px and overlapping node boxes. */
  readability() {
    return { scale: this.canvas.ds.scale, titlePx: this.canvas.ds.scale * LiteGraph.NODE_TEXT_SIZE, overlaps: overlaps(this.graph._nodes) };
  }

  nodeInfo(nodeId) {
    const node = nodeByWorkflowId(this.graph, nodeId);
    if (!node) return null;
    return {
      id: workflowId(node),
      type: node.type,
      runState: node.runState,
      progress: node.dgProgress ?? null,
      images: (node.outputImages ?? []).filter((i) => i.complete && i.naturalWidth).length,
      imageUrls: node.outputUrls ?? [],
      videos: (node.outputVideos ?? []).map((v) => ({ tag: v.el.tagName, url: v.url, poster: v.poster, posterLoaded: !!v.posterImage,
        readyState: v.el.readyState, playing: !v.el.paused, width: v.el.videoWidth, height: v.el.videoHeight })),
      videoFramesDrawn: node.videoFramesDrawn ?? 0,
      text: node.outputText,
      problems: this.problemsFor(node),
      bypass: node.mode === BYPASS_MODE,
      widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value])),
    };
  }
}

Object.assign(Editor.prototype, drawMethods, runMethods, dialogMethods, fileMethods, galleryMethods, maskMethods, overlayMethods, subgraphMethods);

/** Entry point used by the NiceGUI component. */
export async function mount(root, options) {
  const editor = new Editor(root, options);
  window.ditgraph = editor;
  await editor.start();
  return editor;
}
