// A small overview of the whole workflow in the canvas corner: node boxes and the visible
// area; click or drag in it to move the view. Redrawn only when the graph or the view changed.
import { LiteGraph } from "/static/vendor/litegraph/litegraph.es.js";
import { el } from "./palette.js";

const W = 180;
const H = 120;

export class Minimap {
  constructor(editor) {
    this.editor = editor;
    this.canvas = el("canvas", { class: "dg-minimap", width: W, height: H, "data-testid": "minimap", title: "Overview: click or drag to move the view" });
    this.signature = "";
    this.canvas.addEventListener("pointerdown", (e) => {
      e.stopPropagation();
      this.canvas.setPointerCapture(e.pointerId);
      this.jump(e);
      const move = (m) => this.jump(m);
      const up = () => {
        this.canvas.removeEventListener("pointermove", move);
        this.canvas.removeEventListener("pointerup", up);
      };
      this.canvas.addEventListener("pointermove", move);
      this.canvas.addEventListener("pointerup", up);
    });
    this.timer = setInterval(() => this.draw(), 300);
  }

  destroy() {
    clearInterval(this.timer);
  }

  /** Graph bounds and the scale that maps them into the minimap. */
  frame() {
    const nodes = this.editor.graph?._nodes ?? [];
    if (!nodes.length) return null;
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - titleH);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const pad = 40;
    [x0, y0, x1, y1] = [x0 - pad, y0 - pad, x1 + pad, y1 + pad];
    const scale = Math.min(W / (x1 - x0), H / (y1 - y0));
    return { x0, y0, scale, nodes };
  }

  /** A cheap fingerprint of node boxes (no strings: it runs every few hundred ms while panning). */
  graphSignature(nodes) {
    let sum = nodes.length;
    for (const n of nodes) sum = (sum * 31 + n.pos[0] * 7 + n.pos[1] * 13 + n.size[0] * 17 + n.size[1] * 19) % 1e12;
    return `${sum}|${this.editor.settings.values.theme}`;
  }

  /** The node boxes, drawn once per graph change into an offscreen layer. */
  drawLayer(f) {
    this.layer ??= el("canvas", { width: W, height: H });
    const ctx = this.layer.getContext("2d");
    const { theme } = this.editor;
    ctx.clearRect(0, 0, W, H);
    ctx.globalAlpha = 0.85;
    ctx.fillStyle = theme.barBack;
    ctx.fillRect(0, 0, W, H);
    ctx.globalAlpha = 1;
    if (!f) return;
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    ctx.fillStyle = theme.muted;
    for (const n of f.nodes) {
      ctx.fillRect((n.pos[0] - f.x0) * f.scale, (n.pos[1] - titleH - f.y0) * f.scale, Math.max(2, n.size[0] * f.scale), Math.max(2, (n.size[1] + titleH) * f.scale));
    }
  }

  draw() {
    const { editor } = this;
    if (!editor.graph || !this.canvas.isConnected) return;
    const ds = editor.canvas.ds;
    const graphSig = this.graphSignature(editor.graph._nodes);
    const viewSig = `${graphSig}|${ds.offset[0]},${ds.offset[1]}|${ds.scale}`;
    if (viewSig === this.signature) return;
    this.signature = viewSig;
    if (graphSig !== this.graphSig) {
      this.graphSig = graphSig;
      this.cached = this.frame();
      this.drawLayer(this.cached);
    }
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, W, H);
    ctx.drawImage(this.layer, 0, 0);
    const f = this.cached;
    if (!f) return;
    const [vx, vy] = [(-ds.offset[0] - f.x0) * f.scale, (-ds.offset[1] - f.y0) * f.scale];
    const { width, height } = editor.canvas.canvas; // device pixels = CSS pixels here (no DPR scaling)
    ctx.strokeStyle = "#3b7ce6";
    ctx.lineWidth = 2;
    ctx.strokeRect(vx, vy, (width / ds.scale) * f.scale, (height / ds.scale) * f.scale);
  }

  /** Centre the view on the graph point under the pointer. */
  jump(e) {
    const f = this.frame();
    if (!f) return;
    const r = this.canvas.getBoundingClientRect();
    const gx = f.x0 + (e.clientX - r.left) / f.scale;
    const gy = f.y0 + (e.clientY - r.top) / f.scale;
    const ds = this.editor.canvas.ds;
    const rect = this.editor.canvasEl.getBoundingClientRect();
    ds.offset = [rect.width / ds.scale / 2 - gx, rect.height / ds.scale / 2 - gy];
    this.editor.canvas.setDirty(true, true);
    this.draw();
  }
}
