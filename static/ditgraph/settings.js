// User settings (localStorage): theme, and run options sent with every run (cache policy,
// VRAM budget, preview method). The engine does not read the run options yet: they travel in
// POST /api/runs as "options" so the server can honour them without a UI change.
import { LGraphCanvas, LiteGraph } from "/static/vendor/litegraph/litegraph.es.js";
import { el } from "./palette.js";

const KEY = "ditgraph.settings";
export const DEFAULTS = { theme: "dark", cache_policy: "default", vram_budget_gb: "", preview_method: "auto" };

export const THEMES = {
  dark: {
    canvas: "#1f2125", text: "#cfd3da", muted: "#9aa0a8", barBack: "#2a2d33",
    node: "#353a42", nodeBg: "#2a2d33", title: "#e6e6e6", nodeText: "#cfd3da", widgetBg: "#1f2125", widgetText: "#dddddd", widgetOutline: "#555a63",
  },
  light: {
    canvas: "#eef0f3", text: "#25292f", muted: "#5b616b", barBack: "#d5d9df",
    node: "#c9d3e0", nodeBg: "#f8f9fb", title: "#1c2026", nodeText: "#2b2f36", widgetBg: "#e7eaef", widgetText: "#1c2026", widgetOutline: "#a5acb7",
  },
};

const FIELDS = [
  ["theme", "Theme", [["dark", "Dark"], ["light", "Light"]], ""],
  ["cache_policy", "Cache policy", [["default", "Default (keep results within the memory budget)"], ["keep", "Keep models loaded"], ["minimal", "Minimal (free memory after each run)"]],
    "Sent with each run as options.cache_policy (the engine ignores it today)."],
  ["preview_method", "Sampling previews", [["auto", "Latent previews (default)"], ["none", "No previews"]],
    "“No previews” also stops drawing them; sent as options.preview_method."],
];

export class Settings {
  constructor(editor) {
    this.editor = editor;
    let stored = {};
    try {
      stored = JSON.parse(localStorage.getItem(KEY) ?? "{}");
    } catch {
      stored = {};
    }
    this.values = { ...DEFAULTS, ...stored };
  }

  get theme() {
    return THEMES[this.values.theme] ?? THEMES.dark;
  }

  set(name, value) {
    this.values[name] = value;
    localStorage.setItem(KEY, JSON.stringify(this.values));
    if (name === "theme") this.applyTheme();
  }

  /** What each run carries as "options" in POST /api/runs. */
  runOptions() {
    const { cache_policy, vram_budget_gb, preview_method } = this.values;
    const options = { cache_policy, preview_method };
    if (vram_budget_gb !== "" && Number(vram_budget_gb) > 0) options.vram_budget_gb = Number(vram_budget_gb);
    return options;
  }

  applyTheme() {
    const t = this.theme;
    const { editor } = this;
    editor.theme = t;
    editor.app?.classList.toggle("dg-light", this.values.theme === "light");
    Object.assign(LiteGraph, {
      NODE_DEFAULT_COLOR: t.node, NODE_DEFAULT_BGCOLOR: t.nodeBg, NODE_TITLE_COLOR: t.title, NODE_TEXT_COLOR: t.nodeText,
      NODE_SELECTED_TITLE_COLOR: t.title, WIDGET_BGCOLOR: t.widgetBg, WIDGET_TEXT_COLOR: t.widgetText,
      WIDGET_OUTLINE_COLOR: t.widgetOutline, WIDGET_SECONDARY_TEXT_COLOR: t.muted,
    });
    if (editor.canvas) {
      editor.canvas.clear_background_color = t.canvas;
      editor.canvas.node_title_color = t.title;
      editor.canvas.default_link_color = t.muted;
      editor.canvas.setDirty(true, true);
    }
    LGraphCanvas.DEFAULT_BACKGROUND_IMAGE = "";
    document.body.style.background = t.canvas;
  }

  open() {
    const row = ([name, label, choices, hint]) =>
      el(
        "label",
        { class: "dg-setting" },
        el("span", {}, label),
        el("select", { class: "dg-input", "data-testid": `setting-${name}`, onchange: (e) => this.set(name, e.target.value) },
          ...choices.map(([value, text]) => el("option", { value, ...(this.values[name] === value ? { selected: "" } : {}) }, text))),
        hint ? el("small", { class: "dg-muted" }, hint) : null,
      );
    const vram = el("input", { class: "dg-input", type: "number", min: "0", step: "0.5", placeholder: "no limit", value: this.values.vram_budget_gb, "data-testid": "setting-vram_budget_gb" });
    vram.addEventListener("change", () => this.set("vram_budget_gb", vram.value));
    vram.addEventListener("keydown", (e) => e.stopPropagation());
    const close = this.editor.modal(
      el(
        "div",
        { class: "dg-dialog", "data-testid": "settings" },
        el("div", { class: "dg-panel-title" }, "Settings", el("span", { class: "dg-grow" }), el("button", { class: "dg-btn dg-btn-small", onclick: () => close() }, "✕")),
        ...FIELDS.map(row),
        el("label", { class: "dg-setting" }, el("span", {}, "VRAM budget (GB)"), vram,
          el("small", { class: "dg-muted" }, "Sent with each run as options.vram_budget_gb (the engine ignores it today).")),
      ),
    );
  }
}
