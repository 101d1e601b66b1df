// HTML over the canvas: tooltips from the node declarations, and the text editor of
// multi-line prompts. Installed on the Editor's prototype.
import { LiteGraph } from "/static/vendor/litegraph/litegraph.es.js";
import { api } from "./api.js";
import { workflowId } from "./convert.js";
import { el } from "./palette.js";

function describeWidget(widget) {
  const input = widget.inputDef;
  const show = (v) => (Math.abs(v) > Number.MAX_SAFE_INTEGER ? v.toExponential(2) : v);
  const range = input.min !== undefined || input.max !== undefined ? ` [${show(input.min ?? -Infinity)} … ${show(input.max ?? Infinity)}]` : "";
  const start = input.min ?? 0;
  const multiple = !input.snap ? "" : start % input.step === 0 ? `, a multiple of ${input.step}` : `, ${start} plus a multiple of ${input.step}`;
  return `${input.name}: ${input.type}${range}${multiple}${input.tooltip ? `\n${input.tooltip}` : ""}`;
}

export const overlayMethods = {
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
  },

  /** What the declaration says about the thing under the pointer (input, output, widget, node). */
  tooltipAt(clientX, clientY) {
    this.tooltipEstimate = null;
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
      if (widget.y !== undefined && local >= widget.y && local < widget.y + h && widget.inputDef) return describeWidget(widget);
    }
    if (local < 0) {
      if (def.estimates) this.tooltipEstimate = node; // a loader: its VRAM plan follows (appendEstimate)
      return `${def.display_name || def.type} (${def.type})${def.description ? `\n${def.description}` : ""}`;
    }
    return null;
  },

  /** A loader's VRAM plan under the server's budget, from /api/explain, below its title tooltip. */
  async appendEstimate(node, text) {
    this.tooltip.textContent = `${text}\n\nVRAM plan: estimating…`;
    let lines;
    try {
      const estimate = (await api.explain(this.workflow())).estimates?.[workflowId(node)];
      lines = estimate?.lines ?? ["VRAM plan: not estimated (no output needs this node)"];
    } catch (error) {
      lines = [`VRAM plan unavailable: ${error.message}`];
    }
    if (this.tooltip.style.display !== "none" && this.tooltipEstimate === node) {
      this.tooltip.textContent = `${text}\n\n${lines.join("\n")}`;
    }
  },

  showTooltip(clientX, clientY) {
    if (!this.graph || this.textEditor) return;
    const text = this.tooltipAt(clientX, clientY);
    if (!text) return;
    const rect = this.app.getBoundingClientRect();
    this.tooltip.textContent = text;
    this.tooltip.classList.toggle("wide", !!this.tooltipEstimate);
    this.tooltip.style.left = `${clientX - rect.left + 14}px`;
    this.tooltip.style.top = `${clientY - rect.top + 16}px`;
    this.tooltip.style.display = "block";
    if (this.tooltipEstimate) this.appendEstimate(this.tooltipEstimate, text);
  },

  editText(node, widget) {
    this.closeTextEditor(true);
    const area = el("textarea", { class: "dg-text-editor", "data-testid": "text-editor", spellcheck: "false" });
    area.value = widget.value ?? "";
    const scale = this.canvas.ds.scale;
    const [x, y] = this.canvas.ds.convertOffsetToCanvas([node.pos[0] + 15, node.pos[1] + widget.y]);
    area.style.left = `${x}px`;
    area.style.top = `${y}px`;
    area.style.width = `${Math.max((node.size[0] - 30) * scale, 240)}px`;
    area.style.height = `${Math.max(((widget.computedHeight ?? 88) - 4) * scale, 120)}px`;
    area.style.fontSize = `${Math.max(12, 13 * Math.min(scale, 1.4))}px`;
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
  },

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
  },
};
