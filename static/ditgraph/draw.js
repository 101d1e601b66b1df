// What the editor draws on top of litegraph's nodes: run state frames, problem marks,
// images and videos (latent previews, outputs), text outputs, our progress bar and problem messages.
// Installed on the Editor's prototype (editor.js).
import { LiteGraph } from "/static/vendor/litegraph/litegraph.es.js";
import { BYPASS_MODE, STATE_COLOURS, wrapText } from "./nodes.js";

const TEXT_LINE = 14;
const MAX_TEXT_LINES = 8;

function frameColour(node, problems, errors) {
  if (errors.length || node.runState === "error") return STATE_COLOURS.error;
  if (node.runState) return STATE_COLOURS[node.runState];
  return problems.length ? STATE_COLOURS.warning : null;
}

function markProblemInputs(node, ctx, errors) {
  const w = node.size[0];
  ctx.fillStyle = STATE_COLOURS.error;
  ctx.strokeStyle = STATE_COLOURS.error;
  ctx.lineWidth = 2;
  for (const problem of errors) {
    if (!problem.input) continue;
    const slot = node.inputs?.findIndex((i) => i.name === problem.input);
    const widget = node.widgets?.find((wd) => wd.name === problem.input);
    ctx.beginPath();
    if (widget && widget.y !== undefined && widget.type !== "ditgraph_text") {
      ctx.roundRect(12, widget.y - 1, w - 24, LiteGraph.NODE_WIDGET_HEIGHT + 2, 6);
    } else if (slot >= 0) {
      const pos = node.getConnectionPos(true, slot);
      ctx.arc(pos[0] - node.pos[0], pos[1] - node.pos[1], 7, 0, Math.PI * 2);
    }
    ctx.stroke();
  }
}

/** [width, height] of an image or a video element (0 until it has a frame). */
function mediaSize(m) {
  return m instanceof HTMLVideoElement ? (m.readyState >= 2 ? [m.videoWidth, m.videoHeight] : [0, 0]) : [m.naturalWidth, m.naturalHeight];
}

/** What a node shows: its latent preview while sampling, else its videos (each its current frame,
 * or its poster until the first frame is decoded) and images. */
function shownMedia(node) {
  if (node.previewImage) return [node.previewImage];
  const videos = (node.outputVideos ?? []).map((v) => (v.el.readyState >= 2 ? v.el : v.posterImage)).filter(Boolean);
  const images = (node.outputImages ?? []).filter((img) => img.complete);
  return [...videos, ...images].filter((m) => mediaSize(m)[0] > 0);
}

function drawImages(node, ctx, images, body) {
  const w = node.size[0];
  const cols = Math.ceil(Math.sqrt(images.length));
  const rows = Math.ceil(images.length / cols);
  const cw = (w - 20) / cols;
  const ch = (body.h - 8) / rows;
  images.forEach((img, i) => {
    const [mw, mh] = mediaSize(img);
    const scale = Math.min(cw / mw, ch / mh);
    const iw = mw * scale;
    const ih = mh * scale;
    const x = 10 + (i % cols) * cw + (cw - iw) / 2;
    const y = body.y + Math.floor(i / cols) * ch + (ch - ih) / 2;
    // latent previews are tiny: smooth them; outputs shown smaller than they are: smooth too
    ctx.imageSmoothingEnabled = node.previewImage === img || mw > iw;
    ctx.drawImage(img, x, y, iw, ih);
    if (img instanceof HTMLVideoElement || (node.outputVideos ?? []).some((v) => v.posterImage === img)) {
      node.videoFramesDrawn = (node.videoFramesDrawn ?? 0) + 1;
    }
  });
}

/** Output text wrapped to the node's width and cut (with …) to the room below the widgets. */
function textLines(ctx, node, room) {
  ctx.font = "12px monospace";
  const lines = wrapText(ctx, String(node.outputText), node.size[0] - 20);
  const fit = Math.max(1, Math.floor(room / TEXT_LINE));
  if (lines.length <= fit) return lines;
  return [...lines.slice(0, fit - 1), `${lines[fit - 1].slice(0, -1)}…`];
}

function drawMessages(ctx, node, messages) {
  ctx.font = "12px sans-serif";
  let y = node.size[1] + 18;
  for (const message of messages.slice(0, 4)) {
    const text = message.text.length > 90 ? `${message.text.slice(0, 87)}…` : message.text;
    const width = ctx.measureText(text).width + 12;
    ctx.fillStyle = message.warning ? "rgba(110, 80, 10, 0.92)" : "rgba(120, 20, 24, 0.92)";
    ctx.beginPath();
    ctx.roundRect(0, y - 13, Math.max(width, 40), 18, 4);
    ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.fillText(text, 6, y);
    y += 21;
  }
}

export const drawMethods = {
  drawNodeOverlay(node, ctx) {
    const [w, h] = node.size;
    const titleH = LiteGraph.NODE_TITLE_HEIGHT;
    const problems = this.problemsFor(node);
    const errors = problems.filter((p) => p.severity !== "warning");
    const colour = frameColour(node, problems, errors);
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
    markProblemInputs(node, ctx, errors);
    const body = this.freeArea(node);
    const images = shownMedia(node);
    if (images.length && body.h > 20) drawImages(node, ctx, images, body);
    else if (node.outputText && body.h > 10) {
      ctx.fillStyle = this.theme.text;
      textLines(ctx, node, body.h).forEach((line, i) => ctx.fillText(line, 10, body.y + 12 + i * TEXT_LINE));
    }
    // our own bar (litegraph draws node.progress itself: the field is dgProgress so it draws once)
    if (node.dgProgress !== undefined && node.dgProgress !== null) {
      ctx.fillStyle = this.theme.barBack;
      ctx.fillRect(0, h - 6, w, 6);
      ctx.fillStyle = STATE_COLOURS.running;
      ctx.fillRect(0, h - 6, w * Math.max(0, Math.min(1, node.dgProgress)), 6);
      if (node.progressText) {
        ctx.font = "11px sans-serif";
        ctx.fillStyle = this.theme.muted;
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
    if (messages.length) drawMessages(ctx, node, messages);
    ctx.restore();
  },

  /** The part of a node's body below its sockets and widgets (where images go). */
  freeArea(node) {
    let y = (Math.max(node.inputs?.filter((i) => !i.widget).length ?? 0, node.outputs?.length ?? 0) + 0.3) * LiteGraph.NODE_SLOT_HEIGHT;
    // litegraph places widgets (widget.y) when it first draws a node, after our overlay: before
    // then they are stacked below the sockets as it will stack them
    let next = y;
    for (const widget of node.widgets ?? []) {
      const h = widget.computedHeight ?? (widget.computeSize ? widget.computeSize(node.size[0])[1] + 4 : LiteGraph.NODE_WIDGET_HEIGHT + 4);
      const top = widget.y || next; // 0 until litegraph arranged the node
      y = Math.max(y, top + h);
      next = top + h;
    }
    return { y: y + 4, h: node.size[1] - y - 10 };
  },

  ensureImageSpace(node, img) {
    const body = this.freeArea(node);
    const want = Math.min(320, Math.max(160, ((node.size[0] - 20) * img.naturalHeight) / Math.max(1, img.naturalWidth)));
    if (body.h < want) node.setSize([node.size[0], node.size[1] + want - body.h]);
  },

  /** Room for up to MAX_TEXT_LINES wrapped lines of a node's text output. */
  ensureTextSpace(node) {
    const ctx = this.canvasEl.getContext("2d");
    ctx.save();
    ctx.font = "12px monospace";
    const lines = Math.min(MAX_TEXT_LINES, wrapText(ctx, String(node.outputText), node.size[0] - 20).length);
    ctx.restore();
    const body = this.freeArea(node);
    const want = lines * TEXT_LINE + 6;
    if (body.h < want) node.setSize([node.size[0], node.size[1] + want - body.h]);
  },
};
