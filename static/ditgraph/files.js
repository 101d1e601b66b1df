// Files in and out: export/import of workflow JSON, PNGs and videos (MP4/WebM/WebP saved by
// SaveVideo) with an embedded workflow, images uploaded into Load Image nodes (file picker or
// drop) and their previews. Installed on the Editor's prototype.
import { api, workflowFromPngBytes } from "./api.js";
import { FORMAT } from "./convert.js";
import { el } from "./palette.js";

function downloadText(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** The widget of ``node`` that names a file of the input folder (Load Image and the like). */
export function inputFileWidget(node) {
  return node?.widgets?.find((w) => w.inputDef?.file === "input") ?? null;
}

export const fileMethods = {
  exportJson() {
    const doc = this.workflow();
    downloadText(`${this.tabs.active.title}.json`, `${JSON.stringify(doc, null, 2)}\n`);
  },

  /** The node under a client position that takes an uploaded image, and its widget. */
  imageTargetAt(clientX, clientY) {
    if (clientX === undefined) return null;
    const [x, y] = this.clientToGraph(clientX, clientY);
    const node = this.graph.getNodeOnPos(x, y);
    const widget = inputFileWidget(node);
    return widget ? { node, widget } : null;
  },

  async importFile(file, at = {}) {
    try {
      const target = /^image\//.test(file.type) ? this.imageTargetAt(at.x, at.y) : null;
      if (target) {
        // an image dropped on a Load Image node goes into that node, not into the graph
        this.uploadFileInto(target.node, target.widget, file);
        return;
      }
      let doc;
      const name = file.name?.toLowerCase() ?? "";
      if (/^video\//.test(file.type) || /\.(mp4|webm|mov|mkv|webp)$/.test(name)) {
        // the server reads the container's metadata (ffmpeg) or the WebP's EXIF
        let answer;
        try {
          answer = await api.workflowFromPng(file);
        } catch (error) {
          this.toast(`${file.name}: ${error.message}`, "error");
          return;
        }
        doc = answer?.workflow;
        if (!doc || doc.format !== FORMAT) {
          this.toast(`${file.name}: no ditgraph workflow in this file`, "error");
          return;
        }
      } else if (file.type === "image/png" || name.endsWith(".png")) {
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
      } else {
        doc = JSON.parse(await file.text());
      }
      if (this.openDocument(doc, {})) this.toast(`Opened ${file.name}`, "ok");
    } catch (error) {
      this.toast(`${file.name}: ${error.message}`, "error");
    }
  },

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
  },

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
  },

  async uploadFileInto(node, widget, file) {
    try {
      const answer = await api.upload(file);
      this.setInputFile(node, widget, answer.name ?? answer.filename);
      this.toast(`Uploaded ${widget.value}`, "ok");
    } catch (error) {
      this.toast(`Upload failed: ${error.message}`, "error");
    }
  },

  /** Point a file widget at ``name`` (a file of the input folder) and show it. */
  setInputFile(node, widget, name) {
    if (Array.isArray(widget.options?.values) && !widget.options.values.includes(name)) widget.options.values.push(name);
    widget.value = name;
    this.showInputPreview(node);
    this.changed("upload");
  },

  /** A Load Image node always shows the file it names (after a reload, or picked from the list). */
  showInputPreview(node) {
    const widget = inputFileWidget(node);
    if (!widget?.value || node.outputUrls?.length) return;
    const url = api.inputUrl(widget.value);
    if (node.inputPreviewUrl === url && node.outputImages?.length) return;
    node.inputPreviewUrl = url;
    const img = new Image();
    img.onload = () => {
      if (node.inputPreviewUrl !== url) return;
      node.outputImages = [img];
      this.ensureImageSpace(node, img);
      this.canvas.setDirty(true, true);
    };
    img.src = url;
  },

  /** A widget of ``node`` changed: file widgets refresh their preview. */
  widgetChanged(node, widget) {
    if (widget?.inputDef?.file === "input") {
      node.outputUrls = [];
      node.inputPreviewUrl = null;
      this.showInputPreview(node);
    }
    this.changed("widget");
  },
};
