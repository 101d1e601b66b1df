// The ditgraph editor application: canvas, toolbar, palette, queue, workflows, run events.
// Mounted by app/fronts/ui/editor_component.js; everything talks to the server through api.js.
import { ContextMenu, LiteGraph, LGraph, LGraphCanvas, LGraphGroup } from "/static/vendor/litegraph/litegraph.es.js";
import { api, EventStream, workflowFromPngBytes } from "./api.js";
import { FORMAT, graphToWorkflow, nodeByWorkflowId, workflowId, workflowToGraph } from "./convert.js";
import {
  accepts,
  BYPASS_MODE,
  installTypeRules,
  registerCatalogue,
  STATE_COLOURS,
  TYPE_COLOURS,
} from "./nodes.js";
import { el, Palette, SearchPopup } from "./palette.js";

const STORAGE_KEY = "ditgraph.current";

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
const UNDO_LIMIT = 100;

function loadCss(href) {
  if (document.querySelector(`link[href="${href}"]`)) return;
  document.head.append(el("link", { rel: "stylesheet", href }));
}

function newClientId() {
  // one id per page load, so two tabs (even a duplicated one) never share an event stream
  return crypto.randomUUID ? crypto.randomUUID() : `c${Math.random().toString(16).slice(2)}${Date.now().toString(16)}`;
}

function downloadText(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function imageUrls(ui) {
  const urls = [];
  for (const item of ui?.images ?? []) {
    if (typeof item === "string") urls.push(item.startsWith("data:") || item.startsWith("/") ? item : api.outputUrl(item));
    else if (item?.url) urls.push(item.url);
    else if (item?.path) urls.push(item.type === "temp" ? `/api/temp/${item.path.split("/").map(encodeURIComponent).join("/")}` : api.outputUrl(item.path));
    // bare {filename, subfolder, type} entries are resolved by the server when the run ends (fetchOutputs)
  }
  return urls;
}

class Editor {
  constructor(root, options) {
    this.root = root;
    this.options = options;
    this.clientId = newClientId();
    this.accepts = accepts;
    this.problems = []; // from /api/validate or a refused run
    this.showProblems = false; // become live after the first run attempt or Validate
    this.undoStack = [];
    this.redoStack = [];
    this.runs = new Map(); // run_id -> {nodes: Set of workflow ids} for runs this tab queued
    this.name = null; // the saved workflow this tab edits (null = unsaved)
    this.meta = {};
    this.loading = false;
    this.eventLog = []; // every websocket event of this tab (tests and debugging read it)
  }

  // ---------------------------------------------------------------- setup
  async start() {
    const { staticUrl } = this.options;
    loadCss(`${staticUrl}/vendor/litegraph/litegraph.css`);
    loadCss(`${staticUrl}/ditgraph/editor.css`);
    this.buildDom();
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

    this.graph = new LGraph();
    this.canvas = new LGraphCanvas(this.canvasEl, this.graph);
    this.canvas.background_image = ""; // no fetch of a grid image
    this.canvas.clear_background_color = "#1f2125";
    this.canvas.render_canvas_border = false;
    this.canvas.show_info = false;
    // a whole txt2img graph fits at ~0.45: keep titles and widget values readable there
    this.canvas.low_quality_zoom_threshold = 0.4;
    this.canvas.showSearchBox = (event, opts) => this.openSearch(event, opts);
    this.canvas.getExtraMenuOptions = (_c, options) => this.extraCanvasMenu(options);
    this.canvas.onAfterChange = () => this.changed("after_change");
    this.canvas.onNodeDblClicked = (node) => {
      if (node.outputUrls?.length) this.showImages(node.outputUrls);
    };
    this.canvas.onNodeMoved = () => this.changed("moved");
    this.graph.onNodeAdded = (node) => this.nodeAdded(node);
    this.graph.onNodeRemoved = () => this.changed("removed");
    this.graph.onAfterChange = () => this.changed("after_change");
    this.patchNodeMenu();

    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.canvasWrap);
    this.resize();
    this.events = new EventStream(this.clientId, (e) => this.onEvent(e), (ok) => this.setConnected(ok));
    this.keyHandler = (e) => this.onKey(e);
    window.addEventListener("keydown", this.keyHandler, true);
    // a new user action first commits the previous one (input events can overtake timers)
    this.pointerHandler = () => this.flushChange();
    window.addEventListener("pointerdown", this.pointerHandler, true);
    this.setupDrop();
    this.setupTooltips();
    await this.loadInitial();
    this.pollTimer = setInterval(() => this.refreshQueue(), 5000);
    this.refreshQueue();
    this.ready = true;
    this.root.dataset.ready = "1";
    return this;
  }

  destroy() {
    clearInterval(this.pollTimer);
    this.events?.close();
    this.resizeObserver?.disconnect();
    window.removeEventListener("keydown", this.keyHandler, true);
    window.removeEventListener("pointerdown", this.pointerHandler, true);
    this.canvas?.stopRendering?.();
  }

  buildDom() {
    const button = (label, title, onclick, id, cls = "") =>
      el("button", { class: `dg-btn ${cls}`, title, onclick, "data-testid": id }, label);
    this.nameEl = el("span", { class: "dg-name", "data-testid": "workflow-name", title: "Workflow name" }, "untitled");
    this.dirtyEl = el("span", { class: "dg-dirty" }, "");
    this.statusEl = el("span", { class: "dg-conn", title: "Event stream" }, "●");
    this.queueCountEl = el("span", { class: "dg-queue-count", "data-testid": "queue-count" }, "0");
    const toolbar = el(
      "header",
      { class: "dg-toolbar" },
      button("☰", "Show or hide the node palette", () => this.togglePanel("palette"), "btn-toggle-palette"),
      el("span", { class: "dg-brand" }, "ditgraph"),
      this.nameEl,
      this.dirtyEl,
      el("span", { class: "dg-sep" }),
      button("New", "New empty workflow", () => this.newWorkflow(), "btn-new"),
      button("Open…", "Open a saved or shipped workflow (Ctrl+O)", () => this.openDialog(), "btn-open"),
      button("Save", "Save in your workflows folder (Ctrl+S)", () => this.save(), "btn-save"),
      button("Save as…", "Save under a new name", () => this.save(true), "btn-save-as"),
      button("Rename…", "Rename the saved workflow", () => this.rename(), "btn-rename"),
      button("Export", "Download as a JSON file", () => this.exportJson(), "btn-export"),
      button("Import…", "Load a workflow JSON file or a ditgraph PNG", () => this.fileInput.click(), "btn-import"),
      el("span", { class: "dg-sep" }),
      button("↶", "Undo (Ctrl+Z)", () => this.undo(), "btn-undo"),
      button("↷", "Redo (Ctrl+Shift+Z / Ctrl+Y)", () => this.redo(), "btn-redo"),
      button("Validate", "Check the workflow and show problems on the nodes", () => this.validate(true), "btn-validate"),
      el("span", { class: "dg-grow" }),
      this.statusEl,
      button("Queue", "Show or hide the queue and problems panel", () => this.togglePanel("side"), "btn-toggle-side"),
      button("Cancel", "Cancel this tab's running and queued runs", () => this.cancelMine(), "btn-cancel", "dg-btn-danger"),
      button("▶ Run", "Queue the workflow (Ctrl+Enter)", () => this.run(), "btn-run", "dg-btn-primary"),
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
    const side = el(
      "aside",
      { class: "dg-side" },
      el(
        "div",
        { class: "dg-panel-title" },
        "Queue ",
        this.queueCountEl,
        el("span", { class: "dg-grow" }),
        el("button", { class: "dg-btn dg-btn-small", onclick: () => this.cancelAll(), "data-testid": "btn-cancel-all" }, "Cancel all"),
      ),
      this.queueList,
      el("div", { class: "dg-panel-title" }, "Problems"),
      this.problemList,
    );
    this.toastEl = el("div", { class: "dg-toasts" });
    this.app = el("div", { class: "dg-app" }, toolbar, el("div", { class: "dg-body" }, paletteEl, this.canvasWrap, side), this.toastEl, this.fileInput);
    this.root.append(this.app);
    for (const panel of ["palette", "side"]) {
      if (localStorage.getItem(`ditgraph.hide.${panel}`) === "1") this.app.classList.add(`dg-hide-${panel}`);
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
      if (options[i] && /subgraph/i.test(options[i].content ?? "")) options.splice(i, 1);
    }
    // litegraph appends what this returns
    return [
      null,
      { content: "Add group for selected nodes (Ctrl+G)", callback: () => this.groupSelected() },
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
      options.unshift(
        { content: node.mode === BYPASS_MODE ? "Un-bypass (Ctrl+B)" : "Bypass (Ctrl+B)", callback: () => this.toggleBypass([node]) },
        { content: "Run up to this node", callback: () => this.run([workflowId(node)]) },
        null,
      );
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
    this.graph.arrange?.(80);
    this.canvas.setDirty(true, true);
    this.changed("arrange");
  }

  // ---------------------------------------------------------------- drawing on nodes
  isProblemWidget(node, name) {
    return this.problemsFor(node).some((p) => p.input === name && p.severity !== "warning");
  }

  problemsFor(node) {
    if (!this.showProblems || !this.problems.length) return [];
    const id = workflowId(node);
    return this.problems.filter((p) => p.node !== null && p.node !== undefined && String(p.node) === id);
  }

  drawNodeOverlay(node, ctx) {
    const [w, h] = node.size;
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    const problems = this.problemsFor(node);
    const errors = problems.filter((p) => p.severity !== "warning");
    let colour = null;
    if (errors.length || node.runState === "error") colour = STATE_COLOURS.error;
    else if (node.runState) colour = STATE_COLOURS[node.runState];
    else if (problems.length) colour = STATE_COLOURS.warning;
    ctx.save();
    if (node.mode === BYPASS_MODE) {
      ctx.fillStyle = "rgba(190, 80, 255, 0.22)";
      ctx.fillRect(0, -titleH, w, h + titleH);
    }
    if (colour && !node.flags?.collapsed) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = node.runState === "running" ? 3 : 2;
      ctx.beginPath();
      ctx.roundRect(-3, -titleH - 3, w + 6, h + titleH + 6, 10);
      ctx.stroke();
    }
    if (node.flags?.collapsed) {
      ctx.restore();
      return;
    }
    // inputs named by a problem: a red dot on the socket or a frame on the widget
    for (const problem of errors) {
      if (!problem.input) continue;
      const slot = node.inputs?.findIndex((i) => i.name === problem.input);
      const widget = node.widgets?.find((wd) => wd.name === problem.input);
      ctx.fillStyle = STATE_COLOURS.error;
      ctx.strokeStyle = STATE_COLOURS.error;
      if (widget && widget.y !== undefined && widget.type !== "ditgraph_text") {
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.roundRect(12, widget.y - 1, w - 24, LiteGraph.NODE_WIDGET_HEIGHT + 2, 6);
        ctx.stroke();
      } else if (slot >= 0) {
        const pos = node.getConnectionPos(true, slot);
        ctx.beginPath();
        ctx.arc(pos[0] - node.pos[0], pos[1] - node.pos[1], 7, 0, Math.PI * 2);
        ctx.lineWidth = 2;
        ctx.stroke();
      }
    }
    const body = this.freeArea(node);
    let y = body.y;
    // images: latent preview while sampling, then outputs of Save/Preview nodes
    const images = node.previewImage ? [node.previewImage] : node.outputImages ?? [];
    const loaded = images.filter((img) => img.complete && img.naturalWidth);
    if (loaded.length && body.h > 20) {
      const cols = Math.ceil(Math.sqrt(loaded.length));
      const rows = Math.ceil(loaded.length / cols);
      const cw = (w - 20) / cols;
      const ch = (body.h - 8) / rows;
      loaded.forEach((img, i) => {
        const scale = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
        const iw = img.naturalWidth * scale;
        const ih = img.naturalHeight * scale;
        const x = 10 + (i % cols) * cw + (cw - iw) / 2;
        const iy = y + Math.floor(i / cols) * ch + (ch - ih) / 2;
        // latent previews are tiny: smooth them; outputs shown smaller than they are: smooth too
        ctx.imageSmoothingEnabled = node.previewImage === img || img.naturalWidth > iw;
        ctx.drawImage(img, x, iy, iw, ih);
      });
    } else if (node.outputText && body.h > 10) {
      ctx.fillStyle = "#cfd3da";
      ctx.font = "12px monospace";
      String(node.outputText)
        .split("\n")
        .slice(0, Math.floor(body.h / 14))
        .forEach((line, i) => ctx.fillText(line.slice(0, Math.floor(w / 7)), 10, y + 14 + i * 14));
    }
    if (node.progress !== undefined && node.progress !== null) {
      ctx.fillStyle = "#2a2d33";
      ctx.fillRect(0, h - 6, w, 6);
      ctx.fillStyle = STATE_COLOURS.running;
      ctx.fillRect(0, h - 6, w * Math.max(0, Math.min(1, node.progress)), 6);
      if (node.progressText) {
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#9aa0a8";
        ctx.textAlign = "right";
        ctx.fillText(node.progressText, w - 6, -titleH + 19);
        ctx.textAlign = "left";
      }
    }
    // problem messages hang below the node, where they do not cover widgets
    const messages = problems.map((p) => ({ text: `${p.input ? `${p.input}: ` : ""}${p.message}`, warning: p.severity === "warning" }));
    if (node.runState === "error" && node.errorMessage && !problems.some((p) => p.kind === "run_failed")) {
      messages.push({ text: node.errorMessage, warning: false });
    }
    if (messages.length) {
      ctx.font = "12px sans-serif";
      let my = h + 18;
      for (const message of messages.slice(0, 4)) {
        const text = message.text.length > 90 ? `${message.text.slice(0, 87)}…` : message.text;
        const tw = ctx.measureText(text).width + 12;
        ctx.fillStyle = message.warning ? "rgba(110, 80, 10, 0.92)" : "rgba(120, 20, 24, 0.92)";
        ctx.beginPath();
        ctx.roundRect(0, my - 13, Math.max(tw, 40), 18, 4);
        ctx.fill();
        ctx.fillStyle = "#fff";
        ctx.fillText(text, 6, my);
        my += 21;
      }
    }
    ctx.restore();
  }

  /** The part of a node's body below its sockets and widgets (where images go). */
  freeArea(node) {
    let y = (Math.max(node.inputs?.filter((i) => !i.widget).length ?? 0, node.outputs?.length ?? 0) + 0.3) * LiteGraph.NODE_SLOT_HEIGHT;
    for (const widget of node.widgets ?? []) {
      if (widget.y !== undefined) y = Math.max(y, widget.y + (widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4));
    }
    return { y: y + 4, h: node.size[1] - y - 10 };
  }

  ensureImageSpace(node, img) {
    const body = this.freeArea(node);
    const want = Math.min(320, Math.max(160, ((node.size[0] - 20) * img.naturalHeight) / Math.max(1, img.naturalWidth)));
    if (body.h < want) node.setSize([node.size[0], node.size[1] + want - body.h]);
  }

  /** Pick an image, upload it (POST /api/uploads) and point ``widget`` at the stored file. */
  uploadInto(node, widget) {
    const input = el("input", { type: "file", accept: "image/png,image/jpeg,image/webp", style: "display:none" });
    input.addEventListener("change", () => {
      const file = input.files?.[0];
      input.remove();
      if (file) this.uploadFileInto(node, widget, file);
    });
    document.body.append(input);
    input.click();
  }

  async uploadFileInto(node, widget, file) {
    try {
      const answer = await api.upload(file);
      const name = answer.name ?? answer.filename;
      if (Array.isArray(widget.options?.values) && !widget.options.values.includes(name)) widget.options.values.push(name);
      widget.value = name;
      const img = new Image();
      img.onload = () => {
        node.outputImages = [img];
        this.ensureImageSpace(node, img);
        this.canvas.setDirty(true, true);
      };
      img.src = URL.createObjectURL(file);
      this.changed("upload");
      this.toast(`Uploaded ${name}`, "ok");
    } catch (error) {
      this.toast(`Upload failed: ${error.message}`, "error");
    }
  }

  // ---------------------------------------------------------------- text overlay (multi-line prompts)
  editText(node, widget) {
    this.closeTextEditor(true);
    const area = el("textarea", { class: "dg-text-editor", "data-testid": "text-editor", spellcheck: "false" });
    area.value = widget.value ?? "";
    const place = () => {
      const scale = this.canvas.ds.scale;
      const [x, y] = this.canvas.ds.convertOffsetToCanvas([node.pos[0] + 15, node.pos[1] + widget.y]);
      const width = (node.size[0] - 30) * scale;
      area.style.left = `${x}px`;
      area.style.top = `${y}px`;
      area.style.width = `${Math.max(width, 240)}px`;
      area.style.height = `${Math.max(((widget.computedHeight ?? 88) - 4) * scale, 120)}px`;
      area.style.fontSize = `${Math.max(12, 13 * Math.min(scale, 1.4))}px`;
    };
    place();
    this.overlay.append(area);
    this.textEditor = { area, node, widget };
    area.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Escape") this.closeTextEditor(false);
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.closeTextEditor(true);
      }
    });
    area.addEventListener("blur", () => this.closeTextEditor(true));
    setTimeout(() => area.focus(), 0);
  }

  closeTextEditor(commit) {
    const editing = this.textEditor;
    if (!editing) return;
    this.textEditor = null;
    if (commit && editing.widget.value !== editing.area.value) {
      editing.widget.value = editing.area.value;
      this.changed("text");
    }
    editing.area.remove();
    this.canvas.setDirty(true, true);
  }

  // ---------------------------------------------------------------- change tracking, undo/redo
  workflow() {
    return graphToWorkflow(this.graph, { meta: { ...this.meta, name: this.name ?? this.meta.name ?? "untitled" }, canvas: this.canvas });
  }

  /** What undo compares: the workflow without the viewport (panning is not an edit). */
  snapshot() {
    const doc = graphToWorkflow(this.graph, { meta: this.meta });
    return JSON.stringify(doc);
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
    if (this.loading || !this.graph) return;
    const snap = this.snapshot();
    const top = this.undoStack[this.undoStack.length - 1];
    if (snap !== top) {
      // the last run's done/cached marks describe the graph as it was: drop them (images stay)
      for (const node of this.graph._nodes) {
        if (node.runState === "done" || node.runState === "cached") node.runState = null;
      }
      this.undoStack.push(snap);
      if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
      this.redoStack = [];
      this.setDirty(snap !== this.savedSnapshot);
    }
    this.persist();
    if (this.showProblems) {
      clearTimeout(this.validateTimer);
      this.validateTimer = setTimeout(() => this.validate(false), 250);
    }
  }

  resetHistory() {
    this.undoStack = [this.snapshot()];
    this.redoStack = [];
  }

  restoreSnapshot(snap) {
    const viewport = { offset: [...this.canvas.ds.offset], scale: this.canvas.ds.scale };
    this.loadDocument(JSON.parse(snap), { keepHistory: true, keepName: true });
    this.canvas.ds.offset = viewport.offset;
    this.canvas.ds.scale = viewport.scale;
    this.setDirty(snap !== this.savedSnapshot);
    this.persist();
    if (this.showProblems) this.validate(false);
  }

  undo() {
    this.flushChange();
    if (this.undoStack.length < 2) return;
    this.redoStack.push(this.undoStack.pop());
    this.restoreSnapshot(this.undoStack[this.undoStack.length - 1]);
  }

  redo() {
    this.flushChange();
    const snap = this.redoStack.pop();
    if (!snap) return;
    this.undoStack.push(snap);
    this.restoreSnapshot(snap);
  }

  flushChange() {
    if (this.changeTimer) {
      clearTimeout(this.changeTimer);
      this.changeTimer = null;
      this.commitChange();
    }
  }

  setDirty(dirty) {
    this.dirty = dirty;
    this.dirtyEl.textContent = dirty ? "●" : "";
    this.dirtyEl.title = dirty ? "Unsaved changes" : "";
  }

  persist() {
    try {
      // this tab's graph survives a reload of this tab; a new tab starts from the last edited one
      const text = JSON.stringify({ name: this.name, workflow: this.workflow() });
      sessionStorage.setItem(STORAGE_KEY, text);
      localStorage.setItem(STORAGE_KEY, text);
    } catch {
      // storage full or disabled: the editor still works, it just will not restore the graph
    }
  }

  // ---------------------------------------------------------------- loading and saving
  loadDocument(doc, { keepHistory = false, keepName = false, name = undefined } = {}) {
    if (!doc || doc.format !== FORMAT) {
      this.toast("Not a ditgraph workflow (its \"format\" is not ditgraph/workflow)", "error");
      return false;
    }
    this.closeTextEditor(false);
    this.loading = true;
    let warnings;
    try {
      warnings = workflowToGraph(doc, this.graph, this.canvas);
    } finally {
      this.loading = false;
    }
    this.meta = { ...(doc.meta ?? {}) };
    if (!keepName) this.setName(name === undefined ? null : name);
    for (const node of this.graph._nodes) this.clearRunState(node);
    if (!keepHistory) {
      this.resetHistory();
      this.problems = [];
      this.showProblems = false;
      this.renderProblems();
      if (!doc.layout?.viewport) this.fitView();
    }
    for (const warning of warnings.slice(0, 3)) this.toast(warning, "warning", 6000);
    // draw now: litegraph hit-tests against bounds computed while drawing
    this.canvas.draw(true, true);
    return true;
  }

  /** Fit ``nodes`` (default: all) into the canvas, zooming in no further than ``maxScale``. */
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
    const scale = Math.max(0.3, Math.min(maxScale, (rect.width - 80) / (x1 - x0), (rect.height - 80) / (y1 - y0)));
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset = [(rect.width / scale - (x1 - x0)) / 2 - x0, (rect.height / scale - (y1 - y0)) / 2 - y0];
    this.canvas.setDirty(true, true);
  }

  setName(name) {
    this.name = name;
    this.nameEl.textContent = name ?? this.meta.name ?? "untitled";
    document.title = `${name ?? "untitled"} — ditgraph`;
  }

  async loadInitial() {
    const stored = sessionStorage.getItem(STORAGE_KEY) ?? localStorage.getItem(STORAGE_KEY);
    if (stored) {
      try {
        const { name, workflow } = JSON.parse(stored);
        if (this.loadDocument(workflow, { name })) return;
      } catch {
        // a broken stored graph falls through to the default workflow
      }
    }
    try {
      if (this.loadDocument(await api.getWorkflow(this.options.defaultWorkflow, "shipped"))) this.fitView();
    } catch {
      this.loadDocument({ format: FORMAT, version: 1, nodes: {}, layout: {}, meta: {} });
    }
    this.savedSnapshot = undefined;
  }

  newWorkflow() {
    this.loadDocument({ format: FORMAT, version: 1, nodes: {}, layout: {}, meta: {} });
    this.canvas.ds.offset = [0, 0];
    this.canvas.ds.scale = 1;
    this.persist();
  }

  async ask(title, value = "") {
    return new Promise((resolve) => {
      const input = el("input", { class: "dg-input", value, "data-testid": "prompt-input" });
      const finish = (result) => {
        dialog.remove();
        resolve(result);
      };
      const dialog = el(
        "div",
        { class: "dg-modal" },
        el(
          "div",
          { class: "dg-dialog", "data-testid": "prompt-dialog" },
          el("div", { class: "dg-panel-title" }, title),
          input,
          el(
            "div",
            { class: "dg-dialog-buttons" },
            el("button", { class: "dg-btn", onclick: () => finish(null) }, "Cancel"),
            el("button", { class: "dg-btn dg-btn-primary", "data-testid": "prompt-ok", onclick: () => finish(input.value.trim() || null) }, "OK"),
          ),
        ),
      );
      input.addEventListener("keydown", (e) => {
        e.stopPropagation();
        if (e.key === "Enter") finish(input.value.trim() || null);
        if (e.key === "Escape") finish(null);
      });
      this.app.append(dialog);
      input.focus();
      input.select();
    });
  }

  async save(asNew = false) {
    let name = this.name;
    if (!name || asNew) {
      name = await this.ask("Save workflow as", name ?? this.meta.name ?? "my-workflow");
      if (!name) return;
      const existing = await api.workflows().catch(() => null);
      const taken = (existing?.workflows ?? []).some((w) => w.source === "user" && w.name === name);
      if (taken && !confirm(`A workflow named “${name}” exists. Replace it?`)) return;
    }
    const doc = this.workflow();
    doc.meta.name = name;
    try {
      await api.putWorkflow(name, doc);
    } catch (error) {
      this.toast(`Save failed: ${error.message}`, "error");
      return;
    }
    this.meta.name = name;
    this.setName(name);
    this.savedSnapshot = this.snapshot();
    this.undoStack[this.undoStack.length - 1] = this.savedSnapshot;
    this.setDirty(false);
    this.persist();
    this.toast(`Saved “${name}”`, "ok");
  }

  async rename() {
    if (!this.name) {
      this.toast("Save the workflow first; then it can be renamed", "warning");
      return;
    }
    const newName = await this.ask(`Rename “${this.name}” to`, this.name);
    if (!newName || newName === this.name) return;
    try {
      await api.renameWorkflow(this.name, newName);
    } catch (error) {
      this.toast(`Rename failed: ${error.message}`, "error");
      return;
    }
    this.meta.name = newName;
    this.setName(newName);
    this.persist();
    this.toast(`Renamed to “${newName}”`, "ok");
  }

  async openWorkflow(name) {
    try {
      const doc = await api.getWorkflow(name, "user");
      if (this.loadDocument(doc, { name })) {
        this.savedSnapshot = this.snapshot();
        this.setDirty(false);
        this.persist();
      }
    } catch (error) {
      this.toast(`Cannot open “${name}”: ${error.message}`, "error");
    }
  }

  async openExample(name) {
    try {
      const doc = await api.getWorkflow(name, "shipped");
      if (this.loadDocument(doc)) {
        this.fitView();
        this.persist();
      }
    } catch (error) {
      this.toast(`Cannot open example “${name}”: ${error.message}`, "error");
    }
  }

  async openDialog() {
    const close = () => modal.remove();
    const list = el("div", { class: "dg-open-list" }, "Loading…");
    const modal = el(
      "div",
      { class: "dg-modal", onclick: (e) => e.target === modal && close() },
      el(
        "div",
        { class: "dg-dialog dg-dialog-wide", "data-testid": "open-dialog" },
        el("div", { class: "dg-panel-title" }, "Open workflow", el("span", { class: "dg-grow" }), el("button", { class: "dg-btn dg-btn-small", onclick: close }, "✕")),
        list,
      ),
    );
    this.app.append(modal);
    let items = [];
    let failure = null;
    try {
      const answer = await api.workflows();
      items = Array.isArray(answer) ? answer : answer?.workflows ?? [];
    } catch (error) {
      failure = error.message;
    }
    const savedItems = items.filter((i) => (i.source ?? "user") === "user");
    const examples = items.filter((i) => i.source === "shipped");
    list.replaceChildren();
    list.append(el("div", { class: "dg-open-heading" }, "Your workflows"));
    if (failure) list.append(el("div", { class: "dg-muted" }, failure));
    else if (!savedItems.length) list.append(el("div", { class: "dg-muted" }, "None saved yet."));
    for (const item of savedItems) {
      const name = typeof item === "string" ? item : item.name;
      list.append(
        el(
          "div",
          { class: "dg-open-item", "data-testid": "saved-workflow", "data-name": name },
          el("span", { class: "dg-open-name", onclick: () => (close(), this.openWorkflow(name)) }, name),
          el(
            "button",
            {
              class: "dg-btn dg-btn-small",
              title: "Delete",
              onclick: async () => {
                if (!confirm(`Delete workflow “${name}”?`)) return;
                await api.deleteWorkflow(name).catch((e) => this.toast(e.message, "error"));
                close();
                this.openDialog();
              },
            },
            "Delete",
          ),
        ),
      );
    }
    list.append(el("div", { class: "dg-open-heading" }, "Examples shipped with ditgraph"));
    for (const example of examples) {
      list.append(
        el(
          "div",
          { class: "dg-open-item", "data-testid": "example-workflow", "data-name": example.name },
          el("span", { class: "dg-open-name", onclick: () => (close(), this.openExample(example.name)) }, example.name),
        ),
      );
    }
  }

  exportJson() {
    const doc = this.workflow();
    downloadText(`${this.name ?? doc.meta.name ?? "workflow"}.json`, `${JSON.stringify(doc, null, 2)}\n`);
  }

  /** The node under a client position that takes an uploaded image, and its widget. */
  imageTargetAt(clientX, clientY) {
    if (clientX === undefined) return null;
    const [x, y] = this.clientToGraph(clientX, clientY);
    const node = this.graph.getNodeOnPos(x, y);
    const widget = node?.widgets?.find((w) => w.inputDef?.file === "input");
    return widget ? { node, widget } : null;
  }

  async importFile(file, at = {}) {
    try {
      const target = /^image\//.test(file.type) ? this.imageTargetAt(at.x, at.y) : null;
      if (target) {
        // an image dropped on a Load Image node goes into that node, not into the graph
        this.uploadFileInto(target.node, target.widget, file);
        return;
      }
      if (file.type === "image/png" || file.name?.toLowerCase().endsWith(".png")) {
        let doc = null;
        try {
          const answer = await api.workflowFromPng(file);
          doc = answer?.workflow ?? answer;
        } catch {
          doc = await workflowFromPngBytes(await file.arrayBuffer()); // server route missing or refused
        }
        if (!doc || doc.format !== FORMAT) {
          this.toast(`${file.name}: no ditgraph workflow in this PNG`, "error");
          return;
        }
        if (this.loadDocument(doc)) {
          this.persist();
          this.toast(`Workflow restored from ${file.name}`, "ok");
        }
      } else {
        const doc = JSON.parse(await file.text());
        if (this.loadDocument(doc)) {
          this.persist();
          this.toast(`Loaded ${file.name}`, "ok");
        }
      }
    } catch (error) {
      this.toast(`${file.name}: ${error.message}`, "error");
    }
  }

  setupDrop() {
    const wrap = this.canvasWrap;
    wrap.addEventListener("dragover", (e) => {
      if (e.dataTransfer?.types?.includes("Files")) {
        e.preventDefault();
        wrap.classList.add("dg-drop");
      }
    });
    wrap.addEventListener("dragleave", () => wrap.classList.remove("dg-drop"));
    wrap.addEventListener("drop", (e) => {
      wrap.classList.remove("dg-drop");
      const file = e.dataTransfer?.files?.[0];
      if (!file) return;
      e.preventDefault();
      e.stopPropagation();
      this.importFile(file, { x: e.clientX, y: e.clientY });
    });
  }

  // ---------------------------------------------------------------- tooltips from the declarations
  setupTooltips() {
    this.tooltip = el("div", { class: "dg-tooltip", "data-testid": "tooltip" });
    this.tooltip.style.display = "none";
    this.app.append(this.tooltip);
    this.canvasEl.addEventListener("pointermove", (e) => {
      this.tooltip.style.display = "none";
      clearTimeout(this.tooltipTimer);
      if (e.buttons) return;
      this.tooltipTimer = setTimeout(() => this.showTooltip(e.clientX, e.clientY), 450);
    });
    this.canvasEl.addEventListener("pointerleave", () => {
      clearTimeout(this.tooltipTimer);
      this.tooltip.style.display = "none";
    });
  }

  /** What the declaration says about the thing under the pointer (input, output, widget, node). */
  tooltipAt(clientX, clientY) {
    const [x, y] = this.clientToGraph(clientX, clientY);
    const node = this.graph.getNodeOnPos(x, y, this.canvas.visible_nodes);
    const def = node?.def ?? node?.constructor?.def;
    if (!def) return null;
    const near = (pos) => Math.abs(pos[0] - x) < 12 && Math.abs(pos[1] - y) < 9;
    for (const [i, slot] of (node.inputs ?? []).entries()) {
      if (slot.widget) continue;
      if (near(node.getConnectionPos(true, i))) {
        const input = def.inputs.find((d) => d.name === slot.name);
        return `${slot.name} (${slot.type}${input && !input.required ? ", optional" : ""})${input?.tooltip ? `\n${input.tooltip}` : ""}`;
      }
    }
    for (const [i, slot] of (node.outputs ?? []).entries()) {
      if (near(node.getConnectionPos(false, i))) {
        const output = def.outputs.find((d) => d.name === slot.name);
        return `${slot.name} (${slot.type})${output?.tooltip ? `\n${output.tooltip}` : ""}`;
      }
    }
    const local = y - node.pos[1];
    for (const widget of node.widgets ?? []) {
      const h = widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4;
      if (widget.y !== undefined && local >= widget.y && local < widget.y + h && widget.inputDef) {
        const input = widget.inputDef;
        const show = (v) => (Math.abs(v) > Number.MAX_SAFE_INTEGER ? v.toExponential(2) : v);
        const range = input.min !== undefined || input.max !== undefined ? ` [${show(input.min ?? -Infinity)} … ${show(input.max ?? Infinity)}]` : "";
        return `${input.name}: ${input.type}${range}${input.tooltip ? `\n${input.tooltip}` : ""}`;
      }
    }
    if (local < 0) return `${def.display_name || def.type} (${def.type})${def.description ? `\n${def.description}` : ""}`;
    return null;
  }

  showTooltip(clientX, clientY) {
    if (!this.graph || this.textEditor) return;
    const text = this.tooltipAt(clientX, clientY);
    if (!text) return;
    const rect = this.app.getBoundingClientRect();
    this.tooltip.textContent = text;
    this.tooltip.style.left = `${clientX - rect.left + 14}px`;
    this.tooltip.style.top = `${clientY - rect.top + 16}px`;
    this.tooltip.style.display = "block";
  }

  // ---------------------------------------------------------------- keyboard
  onKey(e) {
    this.flushChange();
    const target = e.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable)) return;
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    let handled = true;
    if (mod && key === "enter") this.run();
    else if (mod && key === "z" && !e.shiftKey) this.undo();
    else if (mod && ((key === "z" && e.shiftKey) || key === "y")) this.redo();
    else if (mod && key === "s") this.save(e.shiftKey);
    else if (mod && key === "o") this.openDialog();
    else if (mod && key === "b") this.toggleBypass();
    else if (mod && key === "g") this.groupSelected();
    else handled = false;
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  // ---------------------------------------------------------------- validation
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
    this.problemList.replaceChildren(
      ...(shown.length
        ? shown.map((p) =>
            el(
              "div",
              {
                class: `dg-problem dg-problem-${p.severity}`,
                "data-testid": "problem",
                "data-node": p.node ?? "",
                "data-input": p.input ?? "",
                onclick: () => this.focusNode(p.node),
              },
              el("b", {}, p.node !== null && p.node !== undefined ? this.describeNode(p.node) : "workflow"),
              p.input ? ` · ${p.input}` : "",
              el("div", {}, p.message),
            ),
          )
        : [el("div", { class: "dg-muted" }, this.showProblems ? "No problems." : "Run or Validate to check the workflow.")]),
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

  // ---------------------------------------------------------------- running
  applySeedControls() {
    let changed = false;
    for (const node of this.graph._nodes) {
      for (const control of node.widgets ?? []) {
        if (!control.seedFor || control.value === "fixed") continue;
        const widget = node.widgets.find((w) => w.name === control.seedFor);
        const slot = node.inputs?.find((i) => i.name === control.seedFor);
        if (!widget || slot?.link != null) continue;
        const max = Math.min(widget.options.max ?? 2 ** 32, Number.MAX_SAFE_INTEGER);
        const min = widget.options.min ?? 0;
        if (control.value === "randomize") widget.value = Math.floor(min + Math.random() * Math.min(max - min, 2 ** 48));
        else if (control.value === "increment") widget.value = Math.min(max, widget.value + 1);
        else if (control.value === "decrement") widget.value = Math.max(min, widget.value - 1);
        changed = true;
      }
    }
    if (changed) this.changed("seed");
  }

  /** Queue the workflow; ``targets`` (node ids) limits the run to what they need. */
  async run(targets = null) {
    this.closeTextEditor(true);
    this.applySeedControls();
    this.flushChange();
    const doc = this.workflow();
    this.showProblems = true;
    // events may arrive before the POST answers: reset node states first
    for (const node of this.graph._nodes) this.clearRunState(node, true);
    let answer;
    try {
      answer = await api.queue(doc, this.clientId, Array.isArray(targets) ? targets : null);
    } catch (error) {
      const problems = error.body?.problems ?? error.body?.detail?.problems;
      if (problems) {
        this.setProblems(problems);
        const first = problems.find((p) => p.severity !== "warning") ?? problems[0];
        this.toast(`Not queued: ${problems.filter((p) => p.severity !== "warning").length} problem(s). ${first ? first.message : ""}`, "error", 6000);
      } else {
        this.toast(`Not queued: ${error.message}`, "error");
      }
      return null;
    }
    this.setProblems((this.problems ?? []).filter((p) => p.severity === "warning"));
    this.validate(false);
    const runId = answer.run_id;
    const ended = this.eventLog.find((e) => e.run_id === runId && e.type.startsWith("run_") && e.type !== "run_queued" && e.type !== "run_started");
    const status = ended ? { run_finished: "success", run_failed: "failed", run_cancelled: "cancelled" }[ended.type] : "queued";
    this.runs.set(runId, { nodes: new Set(Object.keys(doc.nodes)), status });
    this.lastRunId = runId;
    this.refreshQueue();
    return runId;
  }

  clearRunState(node, keepImages = false) {
    node.runState = null;
    node.progress = undefined;
    node.progressText = "";
    node.previewImage = null;
    node.errorMessage = null;
    if (!keepImages) {
      node.outputImages = [];
      node.outputText = null;
    }
  }

  async cancelMine() {
    const mine = [...this.runs.entries()].filter(([, r]) => ["queued", "running"].includes(r.status));
    if (!mine.length) {
      this.toast("Nothing of this tab is running", "info");
      return;
    }
    await Promise.all(mine.map(([id]) => api.cancel(id).catch(() => null)));
    this.refreshQueue();
  }

  async cancelAll() {
    await api.cancelAll().catch((e) => this.toast(e.message, "error"));
    this.refreshQueue();
  }

  nodeFor(event) {
    return event.node === undefined || event.node === null ? null : nodeByWorkflowId(this.graph, event.node);
  }

  setNodeUi(node, ui) {
    if (!ui) return;
    const urls = imageUrls(ui);
    const isVideo = (url) => /\.(mp4|webm)(\?|$)/i.test(url);
    node.outputVideos = urls.filter(isVideo);
    if (node.outputVideos.length) node.outputText = `▶ ${node.outputVideos.length} video(s): double-click to play`;
    if (urls.length) {
      node.outputImages = urls.filter((url) => !isVideo(url)).map((url) => {
        const img = new Image();
        img.onload = () => {
          this.ensureImageSpace(node, img);
          this.canvas.setDirty(true, true);
        };
        img.src = url;
        return img;
      });
      node.outputUrls = urls;
    }
    if (ui.text) node.outputText = Array.isArray(ui.text) ? ui.text.join("\n") : String(ui.text);
  }

  onEvent(event) {
    this.eventLog.push(event.type === "progress" ? { ...event, preview: event.preview ? "(data url)" : undefined } : event);
    if (this.eventLog.length > 5000) this.eventLog.splice(0, 1000);
    const run = this.runs.get(event.run_id);
    const node = this.nodeFor(event);
    switch (event.type) {
      case "run_started":
        if (run) run.status = "running";
        for (const id of event.nodes ?? []) {
          const n = nodeByWorkflowId(this.graph, id);
          if (n) n.runState = "queued";
        }
        break;
      case "node_started":
        if (node) {
          node.runState = "running";
          node.progress = 0;
          node.errorMessage = null;
        }
        break;
      case "node_cached":
        if (node) {
          node.runState = "cached";
          node.progress = undefined;
          this.setNodeUi(node, event.ui);
        }
        break;
      case "node_finished":
        if (node) {
          node.runState = "done";
          node.progress = undefined;
          node.progressText = "";
          node.previewImage = null;
          if (node.sizeBeforePreview) {
            // the latent preview is gone: give back the room it took
            node.setSize(node.sizeBeforePreview);
            node.sizeBeforePreview = null;
          }
          this.setNodeUi(node, event.ui);
        }
        break;
      case "node_failed":
        if (node) {
          node.runState = "error";
          node.progress = undefined;
          node.errorMessage = event.message;
        }
        this.toast(event.message ?? "A node failed", "error", 8000);
        // listed with the problems until the graph changes (then validation replaces the list)
        this.showProblems = true;
        this.setProblems([
          ...this.problems.filter((p) => p.kind !== "run_failed"),
          { node: event.node ?? null, input: null, kind: "run_failed", severity: "error", message: event.message ?? "failed" },
        ]);
        break;
      case "progress":
        if (node) {
          node.runState = "running";
          node.progress = event.total ? event.step / event.total : undefined;
          const eta = event.eta !== null && event.eta !== undefined ? ` · ${event.eta.toFixed(1)}s left` : "";
          node.progressText = `${event.step}/${event.total}${eta}`;
          if (event.preview) {
            const img = new Image();
            img.onload = () => {
              node.previewImage = img;
              node.sizeBeforePreview ??= [...node.size];
              this.ensureImageSpace(node, img);
              this.canvas.setDirty(true, true);
            };
            img.src = event.preview;
          }
        }
        break;
      case "run_finished":
      case "run_failed":
      case "run_cancelled":
        if (run) run.status = { run_finished: "success", run_failed: "failed", run_cancelled: "cancelled" }[event.type];
        if (event.type !== "run_cancelled") this.fetchOutputs(event.run_id);
        for (const n of this.graph._nodes) {
          if (n.runState === "queued" || n.runState === "running") n.runState = event.type === "run_cancelled" ? null : n.runState === "running" ? "error" : null;
          n.progress = undefined;
          n.progressText = "";
          n.previewImage = null;
          if (n.sizeBeforePreview) {
            n.setSize(n.sizeBeforePreview);
            n.sizeBeforePreview = null;
          }
        }
        if (event.type === "run_cancelled") this.toast("Run cancelled", "warning");
        if (event.type === "run_failed" && event.error?.node) {
          const failed = nodeByWorkflowId(this.graph, event.error.node);
          if (failed) {
            failed.runState = "error";
            failed.errorMessage = event.error.message;
          }
        }
        this.refreshQueue();
        break;
      case "hello":
        this.queueCountEl.textContent = String((event.queued ?? 0) + (event.running ?? 0));
        break;
      case "queue":
        this.queueCountEl.textContent = String((event.queued ?? 0) + (event.running ?? 0));
        this.refreshQueue();
        break;
      default:
        break;
    }
    this.canvas.setDirty(true, true);
  }

  /** A lightbox with a node's images at full size (double-click the node). */
  showImages(urls) {
    const close = () => box.remove();
    const media = (url) =>
      /\.(mp4|webm)(\?|$)/i.test(url)
        ? el("video", { src: url, controls: "", autoplay: "", loop: "", muted: "", onclick: (e) => e.stopPropagation() })
        : el("a", { href: url, target: "_blank", onclick: (e) => e.stopPropagation() }, el("img", { src: url }));
    const box = el("div", { class: "dg-modal dg-lightbox", "data-testid": "lightbox", onclick: close }, ...urls.map(media));
    this.app.append(box);
  }

  /** Put the workflow a past run used on the canvas, with its output images. */
  async loadRun(runId) {
    try {
      const record = await api.run(runId);
      if (record?.workflow && this.loadDocument(record.workflow)) {
        this.persist();
        await this.fetchOutputs(runId);
      }
    } catch (error) {
      this.toast(`Cannot load run ${runId}: ${error.message}`, "error");
    }
  }

  /** Output files of a finished run with their URLs (authoritative for where images live). */
  async fetchOutputs(runId) {
    let record;
    try {
      record = await api.run(runId);
    } catch {
      return;
    }
    const byNode = new Map();
    for (const output of record?.outputs ?? []) {
      if (!byNode.has(String(output.node))) byNode.set(String(output.node), []);
      byNode.get(String(output.node)).push({ url: output.url });
    }
    for (const [id, images] of byNode) {
      const node = nodeByWorkflowId(this.graph, id);
      if (node) this.setNodeUi(node, { images });
    }
    this.canvas.setDirty(true, true);
  }

  async refreshQueue() {
    let runs;
    try {
      runs = await api.runs();
    } catch {
      return;
    }
    let active;
    if (Array.isArray(runs)) {
      active = runs.filter((r) => ["queued", "pending", "running"].includes(r.status));
      runs = runs.slice(-30).reverse();
    } else {
      active = runs?.queue ?? [];
      runs = [...active, ...(runs?.history ?? [])].slice(0, 30);
    }
    for (const r of runs) {
      const mine = this.runs.get(r.run_id ?? r.id);
      if (mine) mine.status = r.status;
    }
    this.queueCountEl.textContent = String(active.length);
    const shown = runs;
    this.queueList.replaceChildren(
      ...(shown.length
        ? shown.map((r) => {
            const id = r.run_id ?? r.id;
            const mine = this.runs.has(id);
            const live = ["queued", "pending", "running"].includes(r.status);
            return el(
              "div",
              { class: `dg-run dg-run-${r.status}`, "data-testid": "run", "data-run": id, "data-status": r.status },
              el("span", { class: "dg-run-status" }, r.status),
              el("span", { class: "dg-run-name", title: id }, `${r.name ?? r.workflow_name ?? id}${mine ? " (this tab)" : ""}`),
              live
                ? el("button", { class: "dg-btn dg-btn-small", onclick: () => api.cancel(id).then(() => this.refreshQueue()) }, "Cancel")
                : el("button", { class: "dg-btn dg-btn-small", title: "Load the workflow this run used", onclick: () => this.loadRun(id) }, "Load"),
            );
          })
        : [el("div", { class: "dg-muted" }, "No runs yet.")]),
    );
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

  nodesOfType(type) {
    return this.graph._nodes.filter((n) => n.type === type).map((n) => workflowId(n));
  }

  nodeInfo(nodeId) {
    const node = nodeByWorkflowId(this.graph, nodeId);
    if (!node) return null;
    return {
      id: workflowId(node),
      type: node.type,
      runState: node.runState,
      progress: node.progress ?? null,
      images: (node.outputImages ?? []).filter((i) => i.complete && i.naturalWidth).length,
      imageUrls: node.outputUrls ?? [],
      text: node.outputText,
      problems: this.problemsFor(node),
      bypass: node.mode === BYPASS_MODE,
      widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value])),
    };
  }
}

/** Entry point used by the NiceGUI component. */
export async function mount(root, options) {
  const editor = new Editor(root, options);
  window.ditgraph = editor;
  await editor.start();
  return editor;
}
