// History and gallery: every finished run with its time, duration, seeds and thumbnails (a video
// is a <video> with its poster frame, playing while the pointer is on it); filter by workflow;
// click a thumbnail to open it large, "Load" to open the run's workflow (with its images and
// videos) in a new tab; "Delete" forgets the run (GET/DELETE /api/history).
import { api } from "./api.js";
import { el } from "./palette.js";
import { duration } from "./runs.js";

const isMovie = (url) => /\.(mp4|webm|mov|mkv)(\?|$)/i.test(url);

/** A history thumbnail: a <video> (poster frame, plays on hover) for a movie, else an <img>. */
function thumb(output, open) {
  if (!isMovie(output.url)) return el("img", { src: output.url, loading: "lazy", "data-testid": "history-thumb", onclick: open });
  const video = el("video", { src: output.url, preload: output.poster ? "none" : "metadata", "data-testid": "history-video",
    title: [output.frames && `${output.frames} frames`, output.fps && `${output.fps} fps`].filter(Boolean).join(" · "), onclick: open });
  if (output.poster) video.poster = output.poster;
  Object.assign(video, { muted: true, loop: true, playsInline: true });
  video.addEventListener("mouseenter", () => video.play().catch(() => null));
  video.addEventListener("mouseleave", () => video.pause());
  return video;
}

export const galleryMethods = {
  async openHistory(filter = "") {
    const body = el("div", { class: "dg-gallery", "data-testid": "history-list" }, "Loading…");
    const select = el("select", { class: "dg-input", "data-testid": "history-filter" }, el("option", { value: "" }, "All workflows"));
    select.addEventListener("change", () => this.fillHistory(body, select.value));
    const close = this.modal(
      el(
        "div",
        { class: "dg-dialog dg-dialog-gallery", "data-testid": "history" },
        el("div", { class: "dg-panel-title" }, "History", select, el("span", { class: "dg-grow" }), el("button", { class: "dg-btn dg-btn-small", onclick: () => close() }, "✕")),
        body,
      ),
    );
    this.historyClose = close;
    const names = await this.fillHistory(body, filter);
    select.append(...names.map((name) => el("option", { value: name, ...(name === filter ? { selected: "" } : {}) }, name)));
    return body;
  },

  async fillHistory(body, workflow) {
    let answer;
    try {
      answer = await api.history(workflow ? { workflow } : {});
    } catch (error) {
      body.replaceChildren(el("div", { class: "dg-muted" }, error.message));
      return [];
    }
    const runs = answer.runs ?? [];
    body.replaceChildren(...(runs.length ? runs.map((r) => this.historyCard(r, body, workflow)) : [el("div", { class: "dg-muted" }, "No finished runs.")]));
    body.dataset.loaded = workflow || "*";
    return answer.workflows ?? [];
  },

  historyCard(r, body, workflow) {
    const outputs = (r.outputs ?? []).filter((o) => o.kind !== "file");
    const urls = outputs.map((o) => o.url);
    const when = r.finished ? new Date(r.finished * 1000).toLocaleString() : "";
    const remove = async () => {
      await api.deleteHistory(r.run_id).catch((e) => this.toast(e.message, "error"));
      this.fillHistory(body, workflow);
    };
    return el(
      "div",
      { class: `dg-card dg-run-${r.status}`, "data-testid": "history-run", "data-run": r.run_id },
      el(
        "div",
        { class: "dg-thumbs" },
        ...(outputs.length
          ? outputs.slice(0, 4).map((o) => thumb(o, () => this.showImages(urls)))
          : [el("div", { class: "dg-muted" }, r.status === "success" ? "no images" : r.status)]),
      ),
      el("div", { class: "dg-card-name" }, r.name || "untitled"),
      el("div", { class: "dg-muted" }, [when, duration(r.duration), r.seeds?.length ? `seed ${r.seeds.join(", ")}` : ""].filter(Boolean).join(" · ")),
      el(
        "div",
        { class: "dg-dialog-buttons" },
        el("button", { class: "dg-btn dg-btn-small", "data-testid": "history-load", onclick: () => (this.historyClose?.(), this.loadRun(r.run_id)) }, "Load"),
        el("button", { class: "dg-btn dg-btn-small dg-btn-danger", "data-testid": "history-delete", onclick: remove }, "Delete"),
      ),
    );
  },
};
