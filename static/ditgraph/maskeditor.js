// The mask editor: paint / erase / rectangle / ellipse over an image, with brush size and
// feather. Saved like ComfyUI's: the image with the mask in its alpha channel (transparent =
// 1 = the area to change), uploaded into the input folder (POST /api/uploads), so Load Image's
// "mask" output (and LoadImageMask) carries it into Inpaint.
import { api } from "./api.js";
import { el } from "./palette.js";

const TINT = "rgba(255, 48, 96, 1)";
const TOOLS = [["paint", "Paint"], ["erase", "Erase"], ["rect", "Rectangle"], ["ellipse", "Ellipse"]];

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${url}`));
    img.src = url;
  });
}

function canvasOf(w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  return c;
}

export class MaskEditor {
  constructor(editor, img, { name, onSaved }) {
    this.editor = editor;
    this.img = img;
    this.name = name;
    this.onSaved = onSaved;
    this.tool = "paint";
    this.size = Math.max(4, Math.round(Math.min(img.naturalWidth, img.naturalHeight) / 12));
    this.feather = 0;
    const [w, h] = [img.naturalWidth, img.naturalHeight];
    this.mask = el("canvas", { class: "dg-mask-layer", width: w, height: h, "data-testid": "mask-canvas" });
    this.shape = el("canvas", { class: "dg-mask-layer dg-mask-shape", width: w, height: h });
    this.takeExistingMask();
    const fit = Math.min((window.innerWidth * 0.8) / w, (window.innerHeight * 0.62) / h, 8);
    this.stage = el("div", { class: "dg-mask-stage", style: `width:${Math.round(w * fit)}px;height:${Math.round(h * fit)}px` },
      el("img", { src: img.src, class: "dg-mask-image", draggable: "false" }), this.mask, this.shape);
    this.stage.addEventListener("pointerdown", (e) => this.pointerDown(e));
    this.close = editor.modal(this.dom(), { testid: "mask-editor" });
  }

  /** The image's own alpha (a mask painted before) becomes the starting mask. */
  takeExistingMask() {
    const [w, h] = [this.mask.width, this.mask.height];
    const probe = canvasOf(w, h).getContext("2d", { willReadFrequently: true });
    probe.drawImage(this.img, 0, 0);
    const pixels = probe.getImageData(0, 0, w, h);
    const ctx = this.mask.getContext("2d");
    const out = ctx.createImageData(w, h);
    for (let i = 0; i < pixels.data.length; i += 4) {
      out.data.set([255, 48, 96, 255 - pixels.data[i + 3]], i);
    }
    ctx.putImageData(out, 0, 0);
  }

  dom() {
    const toolButtons = TOOLS.map(([tool, label]) =>
      el("button", { class: `dg-btn dg-btn-small${tool === this.tool ? " dg-on" : ""}`, "data-tool": tool, "data-testid": `mask-tool-${tool}`, onclick: (e) => this.pick(tool, e.target) }, label));
    const slider = (label, min, max, value, set, id) => {
      const input = el("input", { type: "range", min, max, value, "data-testid": id });
      input.addEventListener("input", () => set(Number(input.value)));
      return el("label", { class: "dg-mask-slider" }, label, input);
    };
    return el(
      "div",
      { class: "dg-dialog dg-mask-dialog" },
      el("div", { class: "dg-panel-title" }, `Mask for ${this.name}`, el("span", { class: "dg-grow" }), el("span", { class: "dg-muted" }, "painted = area to change")),
      el("div", { class: "dg-mask-tools" }, ...toolButtons,
        slider("size", 1, 256, this.size, (v) => (this.size = v), "mask-size"),
        slider("feather", 0, 64, this.feather, (v) => (this.feather = v), "mask-feather"),
        el("button", { class: "dg-btn dg-btn-small", onclick: () => this.fill(false) }, "Clear"),
        el("button", { class: "dg-btn dg-btn-small", onclick: () => this.fill(true) }, "Fill")),
      this.stage,
      el("div", { class: "dg-dialog-buttons" },
        el("button", { class: "dg-btn", onclick: () => this.close() }, "Cancel"),
        el("button", { class: "dg-btn dg-btn-primary", "data-testid": "mask-save", onclick: () => this.save() }, "Save mask")),
    );
  }

  pick(tool, button) {
    this.tool = tool;
    button.parentElement.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("dg-on", b === button));
  }

  fill(on) {
    const ctx = this.mask.getContext("2d");
    ctx.clearRect(0, 0, this.mask.width, this.mask.height);
    if (on) {
      ctx.fillStyle = TINT;
      ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    }
  }

  toImage(e) {
    const r = this.stage.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * this.mask.width, ((e.clientY - r.top) / r.height) * this.mask.height];
  }

  pointerDown(e) {
    e.preventDefault();
    this.stage.setPointerCapture(e.pointerId);
    const start = this.toImage(e);
    const ctx = this.mask.getContext("2d");
    const shapes = this.shape.getContext("2d");
    let last = start;
    const stroke = (to) => {
      ctx.save();
      ctx.globalCompositeOperation = this.tool === "erase" ? "destination-out" : "source-over";
      ctx.strokeStyle = TINT;
      ctx.lineWidth = this.size;
      ctx.lineCap = "round";
      ctx.beginPath();
      ctx.moveTo(...last);
      ctx.lineTo(...to);
      ctx.stroke();
      ctx.restore();
      last = to;
    };
    const outline = (target, to, erase) => {
      target.save();
      target.globalCompositeOperation = erase ? "destination-out" : "source-over";
      target.fillStyle = TINT;
      target.beginPath();
      const [x, y, w, h] = [Math.min(start[0], to[0]), Math.min(start[1], to[1]), Math.abs(to[0] - start[0]), Math.abs(to[1] - start[1])];
      if (this.tool === "rect") target.rect(x, y, w, h);
      else target.ellipse(x + w / 2, y + h / 2, w / 2, h / 2, 0, 0, Math.PI * 2);
      target.fill();
      target.restore();
    };
    const shaped = this.tool === "rect" || this.tool === "ellipse";
    if (!shaped) stroke(start);
    const move = (m) => {
      const to = this.toImage(m);
      if (!shaped) return stroke(to);
      shapes.clearRect(0, 0, this.shape.width, this.shape.height);
      outline(shapes, to, false);
    };
    const up = (u) => {
      this.stage.removeEventListener("pointermove", move);
      this.stage.removeEventListener("pointerup", up);
      shapes.clearRect(0, 0, this.shape.width, this.shape.height);
      if (shaped) outline(ctx, this.toImage(u), u.altKey); // Alt: cut the shape out of the mask
    };
    this.stage.addEventListener("pointermove", move);
    this.stage.addEventListener("pointerup", up);
  }

  /** The mask (feathered) as alpha values 0..255 per pixel, 255 = painted. */
  maskAlpha() {
    const [w, h] = [this.mask.width, this.mask.height];
    const soft = canvasOf(w, h).getContext("2d", { willReadFrequently: true });
    if (this.feather > 0) soft.filter = `blur(${this.feather / 2}px)`;
    soft.drawImage(this.mask, 0, 0);
    return soft.getImageData(0, 0, w, h).data;
  }

  async save() {
    const [w, h] = [this.mask.width, this.mask.height];
    const out = canvasOf(w, h).getContext("2d", { willReadFrequently: true });
    out.drawImage(this.img, 0, 0);
    const pixels = out.getImageData(0, 0, w, h);
    const mask = this.maskAlpha();
    for (let i = 3; i < pixels.data.length; i += 4) pixels.data[i] = 255 - mask[i];
    out.putImageData(pixels, 0, 0);
    const blob = await new Promise((resolve) => out.canvas.toBlob(resolve, "image/png"));
    const stem = this.name.replace(/\.[^.]*$/, "").replace(/-mask(-[0-9a-f]+)?$/, "").replace(/-[0-9a-f]{12}$/, "");
    try {
      const answer = await api.upload(new File([blob], `${stem}-mask.png`, { type: "image/png" }));
      this.close();
      this.onSaved(answer.name ?? answer.filename);
    } catch (error) {
      this.editor.toast(`Saving the mask failed: ${error.message}`, "error");
    }
  }
}

export const maskMethods = {
  /** Paint the mask of a Load Image node over its image. */
  async openMaskEditor(node, widget) {
    if (!widget.value) {
      this.toast("Choose or upload an image first; then paint its mask", "warning");
      return null;
    }
    return this.maskEditorFor(api.inputUrl(widget.value), widget.value, (name) => this.setInputFile(node, widget, name));
  },

  /** Paint a mask over an output image: the result goes into a new Load Image node. */
  async maskOutput(node) {
    const url = node.outputUrls?.find((u) => !/\.(mp4|webm)(\?|$)/i.test(u));
    if (!url) return null;
    const name = decodeURIComponent(url.split("/").pop().split("?")[0]);
    return this.maskEditorFor(url, name, (saved) => {
      const loader = this.addNode("LoadImage", [node.pos[0] + node.size[0] + 60, node.pos[1]]);
      const widget = loader?.widgets?.find((w) => w.inputDef?.file === "input");
      if (widget) this.setInputFile(loader, widget, saved);
    });
  },

  async maskEditorFor(url, name, onSaved) {
    try {
      const img = await loadImage(url);
      this.maskEditor = new MaskEditor(this, img, { name, onSaved });
      return this.maskEditor;
    } catch (error) {
      this.toast(error.message, "error");
      return null;
    }
  },
};
