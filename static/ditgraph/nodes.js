// Node types for the canvas, generated from the live catalogue (GET /api/nodes).
// Each catalogue entry becomes one LGraphNode subclass: sockets from its inputs/outputs,
// widgets from its widget inputs (ranges, choices, toggles, seeds, multi-line text).
import { LiteGraph, LGraphNode } from "/static/vendor/litegraph/litegraph.es.js";

export const WIDGET_TYPES = new Set(["INT", "FLOAT", "STRING", "BOOLEAN"]);
export const BYPASS_MODE = 4;
export const SEED_CONTROLS = ["fixed", "randomize", "increment", "decrement"];
const SEED_MAX = Number.MAX_SAFE_INTEGER;

const STATE_COLOURS = {
  queued: "#8a8f98",
  running: "#3ddc84",
  cached: "#4aa3ff",
  done: "#2e7d32",
  error: "#ff4d4f",
  warning: "#f5a623",
};

// Socket colours (wires and dots) per type, in the spirit of ComfyUI's palette.
export const TYPE_COLOURS = {
  MODEL: "#b39ddb",
  TEXT_ENCODER: "#ffd54f",
  VAE: "#ff8a80",
  CONDITIONING: "#ffb74d",
  LATENT: "#f48fb1",
  IMAGE: "#64b5f6",
  MASK: "#81c784",
  CONTROL: "#4db6ac",
  LORA: "#ce93d8",
  SIGMAS: "#a1887f",
  NOISE: "#90a4ae",
  INT: "#aed581",
  FLOAT: "#aed581",
  STRING: "#e0e0e0",
  BOOLEAN: "#90caf9",
};

/** Same rule as app/core/types.py accepts(): unions with "|", "*" matches all, INT widens to FLOAT. */
export function accepts(inputType, outputType) {
  if (inputType === undefined || outputType === undefined) return true;
  const a = String(inputType || "*");
  const b = String(outputType || "*");
  if (a === "*" || b === "*" || a === "0" || b === "0") return true;
  const wanted = new Set(a.split("|").map((s) => s.trim()));
  const offered = b.split("|").map((s) => s.trim());
  if (offered.every((t) => wanted.has(t))) return true;
  return offered.length === 1 && offered[0] === "INT" && wanted.has("FLOAT");
}

/** litegraph calls isValidConnection with (output, input) in some places and (input, output) in
 * others; the server's validation is the authority on widening, so accept either direction. */
export function installTypeRules() {
  LiteGraph.isValidConnection = (a, b) => accepts(b, a) || accepts(a, b);
}

function decimals(step) {
  if (!step || step >= 1) return 0;
  return Math.min(6, Math.max(1, Math.ceil(-Math.log10(step) - 1e-9)));
}

function numberOptions(input) {
  const isInt = input.type === "INT";
  const step = input.step ?? (isInt ? 1 : 0.01);
  const options = {
    step2: step,
    step: step * 10,
    round: isInt ? 1 : step,
    precision: isInt ? 0 : decimals(step),
  };
  if (input.min !== undefined && input.min !== null) options.min = input.min;
  if (input.max !== undefined && input.max !== null) options.max = Math.min(input.max, SEED_MAX);
  return options;
}

/** Pieces of ``word`` no wider than ``width`` (a path or hash longer than the node is cut). */
function splitLong(ctx, word, width) {
  if (ctx.measureText(word).width <= width) return [word];
  const pieces = [];
  let piece = "";
  for (const char of word) {
    if (piece && ctx.measureText(piece + char).width > width) {
      pieces.push(piece);
      piece = "";
    }
    piece += char;
  }
  return [...pieces, piece];
}

/** Wrap ``text`` to lines no wider than ``width`` px in ``ctx``'s font. */
export function wrapText(ctx, text, width) {
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (const word of paragraph.split(" ").flatMap((w) => splitLong(ctx, w, width))) {
      const trial = line ? `${line} ${word}` : word;
      if (ctx.measureText(trial).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = trial;
      }
    }
    lines.push(line);
  }
  return lines;
}

/** A multi-line text widget: drawn on the canvas, edited in an HTML textarea overlay. */
function multilineWidget(node, input, editor) {
  const widget = {
    type: "ditgraph_text",
    name: input.name,
    value: input.default ?? "",
    options: { multiline: true },
    tooltip: input.tooltip,
    computeSize(width) {
      return [width ?? 200, 84];
    },
    draw(ctx, drawNode, width, y) {
      const height = (this.computedHeight ?? 88) - 4;
      const margin = 15;
      ctx.save();
      ctx.fillStyle = "#16181c";
      ctx.strokeStyle = editor.isProblemWidget(drawNode, this.name) ? STATE_COLOURS.error : "#4a4f57";
      ctx.lineWidth = editor.isProblemWidget(drawNode, this.name) ? 2 : 1;
      ctx.beginPath();
      ctx.roundRect(margin, y, width - margin * 2, height, 6);
      ctx.fill();
      ctx.stroke();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#8a8f98";
      ctx.fillText(this.name, margin + 6, y + 13);
      const linked = drawNode.inputs?.find((i) => i.widget?.name === this.name)?.link != null;
      ctx.fillStyle = this.value && !linked ? "#e6e6e6" : "#666";
      const shown = linked ? "(set by the linked input)" : this.value || "(click to edit)";
      const lines = wrapText(ctx, shown, width - margin * 2 - 12);
      const maxLines = Math.max(1, Math.floor((height - 20) / 15));
      lines.slice(0, maxLines).forEach((line, i) => {
        const text = i === maxLines - 1 && lines.length > maxLines ? `${line} …` : line;
        ctx.fillText(text, margin + 6, y + 30 + i * 15);
      });
      ctx.restore();
    },
    mouse(event, pos, mouseNode) {
      const linked = mouseNode.inputs?.find((i) => i.widget?.name === this.name)?.link != null;
      if (!linked && (event.type === "pointerdown" || event.type === "mousedown")) {
        editor.editText(mouseNode, this);
        return true;
      }
      return false;
    },
  };
  return node.addCustomWidget(widget);
}

/** Registers one LGraphNode subclass per catalogue entry; returns the classes by type. */
export function registerCatalogue(catalogue, editor) {
  const classes = {};
  for (const def of catalogue) {
    class DitNode extends LGraphNode {
      constructor(title) {
        super(title ?? def.display_name ?? def.type);
        this.def = def;
        this.serialize_widgets = true;
        this.properties ??= {};
        this.runState = null; // queued | running | cached | done | error
        this.progress = undefined;
        this.previewImage = null; // latent preview during sampling
        this.outputImages = []; // images from the node's "ui"
        this.outputVideos = []; // videos from the node's "ui": {url, poster, el: <video>, posterImage}
        this.outputText = null;
        for (const input of def.inputs) {
          if (input.widget) {
            this.addWidgetFor(input);
          } else {
            const slot = this.addInput(input.name, input.type || "*");
            if (input.tooltip) slot.tooltip = input.tooltip;
            if (!input.required) slot.label = `${input.name}?`;
          }
        }
        for (const output of def.outputs) {
          const slot = this.addOutput(output.name, output.type || "*");
          if (output.tooltip) slot.tooltip = output.tooltip;
        }
        const size = this.computeSize();
        size[0] = Math.max(size[0], def.output_node ? 260 : 220);
        if (def.output_node) size[1] = Math.max(size[1], 120);
        this.setSize(size);
      }

      addWidgetFor(input) {
        const onChange = () => editor.widgetChanged(this, widget);
        let widget;
        const choices = input.choices;
        if (input.type === "BOOLEAN") {
          widget = this.addWidget("toggle", input.name, Boolean(input.default), onChange, { on: "true", off: "false" });
        } else if (Array.isArray(choices) && (choices.length || !input.file)) {
          const value = input.default ?? choices[0] ?? "";
          widget = this.addWidget("combo", input.name, value, onChange, { values: choices });
        } else if (input.type === "INT" || input.type === "FLOAT") {
          let value = input.default ?? input.min ?? 0;
          widget = this.addWidget("number", input.name, value, onChange, numberOptions(input));
          if (input.seed) {
            const control = this.addWidget("combo", `${input.name}__control`, "fixed", onChange, {
              values: SEED_CONTROLS,
            });
            control.label = "control before run";
            control.serialize = false;
            control.seedFor = input.name;
            widget.seedControl = control;
          }
        } else if (input.multiline) {
          widget = multilineWidget(this, input, editor);
        } else {
          widget = this.addWidget("text", input.name, input.default ?? "", onChange, {});
        }
        widget.tooltip = input.tooltip;
        widget.inputDef = input;
        if (input.file === "input") {
          // images for LoadImage-style nodes: upload into the server's input folder
          const upload = this.addWidget("button", `${input.name}__upload`, null, () => editor.uploadInto(this, widget), {});
          upload.label = "choose file to upload…";
          upload.serialize = false;
          if (def.outputs.some((o) => o.type === "MASK")) {
            // the image's alpha is the node's mask output: paint it over the image
            const paint = this.addWidget("button", `${input.name}__mask`, null, () => editor.openMaskEditor(this, widget), {});
            paint.label = "paint mask…";
            paint.serialize = false;
          }
        }
        // A socket at the widget so primitives (Seed, PrimitiveInt, ...) can drive it.
        const slot = this.addInput(input.name, input.type, { widget: { name: input.name } });
        if (input.tooltip) slot.tooltip = input.tooltip;
        return widget;
      }

      onConnectionsChange() {
        editor.changed("connection");
      }

      onDrawForeground(ctx) {
        editor.drawNodeOverlay(this, ctx);
      }
    }
    DitNode.title = def.display_name || def.type;
    DitNode.def = def;
    DitNode.desc = def.description;
    LiteGraph.registerNodeType(def.type, DitNode);
    // registerNodeType derives the category from a "/" in the type name; ours comes from the catalogue
    DitNode.category = def.category || "misc";
    classes[def.type] = DitNode;
  }
  return classes;
}

/** A stand-in for a node whose type the server does not know: keeps its data for saving. */
export class MissingNode extends LGraphNode {
  constructor(title) {
    super(title ?? "Missing node");
    this.missing = true;
    this.color = "#5a1d1d";
    this.bgcolor = "#3a1515";
    this.properties ??= {};
  }
  onDrawForeground(ctx) {
    ctx.save();
    ctx.fillStyle = "#ff8a80";
    ctx.font = "12px sans-serif";
    ctx.fillText(`unknown type ${this.properties.missingType}`, 10, this.size[1] - 10);
    ctx.restore();
  }
}
MissingNode.title = "Missing node";
LiteGraph.registerNodeType("ditgraph/missing", MissingNode);

export { STATE_COLOURS };
