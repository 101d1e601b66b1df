// Runs: queueing, the event stream of this page's client id, outputs on the nodes, the runs
// panel, and picking up this page's runs again after a reload. Installed on the Editor's prototype.
//
// The client id is kept in sessionStorage, so a reload keeps receiving the events of the runs it
// queued; which tab queued which run is kept there too, so results land in the right tab.
import { api } from "./api.js";
import { nodeByWorkflowId, workflowId } from "./convert.js";
import { el } from "./palette.js";

const CLIENT_KEY = "ditgraph.client";
const RUNS_KEY = "ditgraph.runs";
const LIVE = ["queued", "pending", "running"];
const ENDED = { run_finished: "success", run_failed: "failed", run_cancelled: "cancelled" };

/** This page's client id: the same after a reload of the page, new for a new page. */
export function clientId() {
  let id = sessionStorage.getItem(CLIENT_KEY);
  if (!id) {
    id = crypto.randomUUID ? crypto.randomUUID() : `c${Math.random().toString(16).slice(2)}${Date.now().toString(16)}`;
    sessionStorage.setItem(CLIENT_KEY, id);
  }
  return id;
}

const isMovie = (url) => /\.(mp4|webm|mov|mkv)(\?|$)/i.test(url);
const tempUrl = (path) => `/api/temp/${path.split("/").map(encodeURIComponent).join("/")}`;

function entryUrl(item) {
  if (typeof item === "string") return item.startsWith("data:") || item.startsWith("/") ? item : api.outputUrl(item);
  if (item?.url) return item.url;
  if (item?.path) return item.type === "temp" ? tempUrl(item.path) : api.outputUrl(item.path);
  return null; // bare {filename, subfolder, type} entries are resolved by the server when the run ends (fetchOutputs)
}

/**
 * What a node's "ui" (an engine event's, a run's outputs grouped by node, or a tab's remembered
 * ones) shows: image URLs and videos ({url, poster}). Videos come under "videos"; a movie file
 * under "images" (SaveAnimated's MP4, runs recorded before videos had their own kind) is one too.
 */
export function mediaOf(ui) {
  const images = [];
  const videos = [];
  for (const item of ui?.images ?? []) {
    const url = entryUrl(item);
    if (url) (isMovie(url) ? videos.push({ url, poster: item?.poster ?? null }) : images.push(url));
  }
  for (const item of ui?.videos ?? []) {
    const url = entryUrl(item);
    if (!url) continue;
    const poster = typeof item.poster === "string" ? item.poster : item.poster?.path ? tempUrl(item.poster.path) : null;
    // animated WebP/GIF play in an <img>; MP4/WebM need a <video>
    if (isMovie(url)) videos.push({ url, poster });
    else images.push(url);
  }
  return { images, videos };
}

/** A node's outputs as a tab remembers them (plain JSON, autosaved with the tab). */
function remembered(media, text) {
  return { images: media.images.map((url) => ({ url })), videos: media.videos, ...(text ? { text } : {}) };
}

function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }) : "";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function rememberRuns(runs) {
  const mine = Object.fromEntries([...runs].filter(([, r]) => LIVE.includes(r.status) || !r.fetched).map(([id, r]) => [id, r.tabId]));
  sessionStorage.setItem(RUNS_KEY, JSON.stringify(mine));
}

export const runMethods = {
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
  },

  /** Queue the workflow; ``targets`` (node ids) limits the run to what they need. */
  async run(targets = null) {
    this.closeTextEditor(true);
    this.applySeedControls();
    this.flushChange();
    const doc = this.workflow();
    const tab = this.tabs.active;
    this.showProblems = true;
    // events may arrive before the POST answers: reset node states first
    for (const node of this.graph._nodes) this.clearRunState(node, true);
    let answer;
    try {
      answer = await api.queue(doc, this.clientId, Array.isArray(targets) ? targets : null, this.settings.runOptions());
    } catch (error) {
      this.refused(error);
      return null;
    }
    this.setProblems((this.problems ?? []).filter((p) => p.severity === "warning"));
    this.validate(false);
    const runId = answer.run_id;
    const ended = this.eventLog.find((e) => e.run_id === runId && ENDED[e.type]);
    this.runs.set(runId, { tabId: tab.id, status: ended ? ENDED[ended.type] : "queued" });
    rememberRuns(this.runs);
    this.lastRunId = runId;
    this.refreshQueue();
    return runId;
  },

  refused(error) {
    const problems = error.body?.problems ?? error.body?.detail?.problems;
    if (!problems) {
      this.toast(`Not queued: ${error.message}`, "error");
      return;
    }
    this.setProblems(problems);
    const first = problems.find((p) => p.severity !== "warning") ?? problems[0];
    this.toast(`Not queued: ${problems.filter((p) => p.severity !== "warning").length} problem(s). ${first ? first.message : ""}`, "error", 6000);
  },

  clearRunState(node, keepImages = false) {
    node.runState = null;
    node.dgProgress = undefined;
    node.progressText = "";
    node.previewImage = null;
    node.errorMessage = null;
    if (!keepImages) {
      node.outputImages = [];
      this.setNodeVideos(node, []);
      node.outputUrls = [];
      node.outputText = null;
    }
  },

  async cancelMine() {
    const mine = [...this.runs.entries()].filter(([, r]) => LIVE.includes(r.status));
    if (!mine.length) {
      this.toast("Nothing of this page is running", "info");
      return;
    }
    await Promise.all(mine.map(([id]) => api.cancel(id).catch(() => null)));
    this.refreshQueue();
  },

  async cancelAll() {
    await api.cancelAll().catch((e) => this.toast(e.message, "error"));
    this.refreshQueue();
  },

  /** Show a node's "ui" (images, videos, text) and remember it in the tab, so undo and reloads keep it. */
  setNodeUi(node, ui, tab = this.tabs.active) {
    if (!ui) return;
    const media = mediaOf(ui);
    const urls = [...media.videos.map((v) => v.url), ...media.images];
    const text = ui.text ? (Array.isArray(ui.text) ? ui.text.join("\n") : String(ui.text)) : null;
    if (tab && (urls.length || text)) tab.outputs[workflowId(node)] = remembered(media, text);
    if (urls.length) {
      this.setNodeVideos(node, media.videos);
      node.outputImages = media.images.map((url) => {
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
    if (text) {
      node.outputText = text;
      this.ensureTextSpace(node);
    }
  },

  /**
   * Videos on a node: each a muted, looping <video> element drawn on the canvas (so it zooms,
   * clips and stacks with the node) over its poster frame until the first frame is decoded.
   * Double-click opens them with controls. The old elements are stopped and let go.
   */
  setNodeVideos(node, videos) {
    const current = node.outputVideos ?? [];
    const same = videos.length === current.length &&
      videos.every((v, i) => v.url === current[i].url && (v.poster ?? null) === (current[i].poster ?? null));
    if (same) return; // node_finished, then the run's record: the same files keep playing, not reloaded
    for (const old of current) {
      old.el.pause();
      old.el.removeAttribute("src");
      old.el.load();
    }
    node.outputVideos = videos.map(({ url, poster }) => {
      const video = document.createElement("video");
      Object.assign(video, { muted: true, loop: true, playsInline: true, preload: "auto" });
      video.dataset.testid = "node-video";
      if (poster) video.poster = poster;
      const shown = { url, poster, el: video, posterImage: null };
      if (poster) {
        const img = new Image();
        img.onload = () => {
          shown.posterImage = img;
          this.ensureImageSpace(node, img);
          this.canvas.setDirty(true, true);
        };
        img.src = poster;
      }
      video.addEventListener("loadedmetadata", () => {
        this.ensureImageSpace(node, { naturalWidth: video.videoWidth, naturalHeight: video.videoHeight });
        this.canvas.setDirty(true, true);
      });
      // redraw the canvas for each new frame while it plays (only then: an idle canvas stays idle)
      const onFrame = () => {
        if (!node.outputVideos?.includes(shown)) return;
        if (this.graph.getNodeById(node.id) !== node) {
          // the node left the canvas (deleted, undone, another tab shown): stop decoding
          this.setNodeVideos(node, []);
          return;
        }
        this.canvas.setDirty(true, false);
        video.requestVideoFrameCallback(onFrame);
      };
      if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onFrame);
      else video.addEventListener("timeupdate", () => this.canvas.setDirty(true, false));
      video.src = url;
      video.play().catch(() => null); // muted autoplay is allowed; a refusal leaves the poster and first frame
      return shown;
    });
  },

  /** Put a tab's remembered outputs back on its nodes (after undo, a tab switch, a reload). */
  applyOutputs(tab) {
    for (const [id, ui] of Object.entries(tab.outputs ?? {})) {
      const node = nodeByWorkflowId(this.graph, id);
      if (node) this.setNodeUi(node, ui, null);
    }
  },

  onEvent(event) {
    this.eventLog.push(event.type === "progress" ? { ...event, preview: event.preview ? "(data url)" : undefined } : event);
    if (this.eventLog.length > 5000) this.eventLog.splice(0, 1000);
    const run = this.runs.get(event.run_id);
    if (run && LIVE.includes(run.status) && event.type === "run_started") run.status = "running";
    if (run && run.tabId !== this.tabs.active?.id) {
      this.backgroundEvent(run, event); // a run of another tab: keep its results there
      return;
    }
    const node = event.node === undefined || event.node === null ? null : nodeByWorkflowId(this.graph, event.node);
    const handler = this.eventHandlers[event.type];
    if (handler) handler.call(this, event, node, run);
    this.canvas.setDirty(true, true);
  },

  backgroundEvent(run, event) {
    const tab = this.tabs.byId(run.tabId);
    if (!tab) return;
    if ((event.type === "node_finished" || event.type === "node_cached") && event.ui && event.node != null) {
      const media = mediaOf(event.ui);
      if (media.images.length || media.videos.length || event.ui.text) tab.outputs[String(event.node)] = remembered(media, event.ui.text);
    }
    if (ENDED[event.type]) {
      run.status = ENDED[event.type];
      if (event.type !== "run_cancelled") this.fetchOutputs(event.run_id);
      this.refreshQueue();
    }
  },

  eventHandlers: {
    run_started(event) {
      for (const id of event.nodes ?? []) {
        const n = nodeByWorkflowId(this.graph, id);
        if (n) n.runState = "queued";
      }
    },
    node_started(event, node) {
      if (!node) return;
      node.runState = "running";
      node.dgProgress = 0;
      node.errorMessage = null;
    },
    node_cached(event, node) {
      if (!node) return;
      node.runState = "cached";
      node.dgProgress = undefined;
      this.setNodeUi(node, event.ui);
    },
    node_finished(event, node) {
      if (!node) return;
      node.runState = "done";
      this.endProgress(node);
      this.setNodeUi(node, event.ui);
    },
    node_failed(event, node) {
      if (node) {
        node.runState = "error";
        node.dgProgress = undefined;
        node.errorMessage = event.message;
      }
      this.toast(event.message ?? "A node failed", "error", 8000);
      // listed with the problems until the graph changes (then validation replaces the list)
      this.showProblems = true;
      this.setProblems([
        ...this.problems.filter((p) => p.kind !== "run_failed"),
        { node: event.node ?? null, input: null, kind: "run_failed", severity: "error", message: event.message ?? "failed" },
      ]);
    },
    progress(event, node) {
      if (!node) return;
      node.runState = "running";
      node.dgProgress = event.total ? event.step / event.total : undefined;
      const eta = event.eta !== null && event.eta !== undefined ? ` · ${event.eta.toFixed(1)}s left` : "";
      node.progressText = `${event.step}/${event.total}${eta}`;
      if (event.preview && this.settings.values.preview_method !== "none") {
        const img = new Image();
        img.onload = () => {
          node.previewImage = img;
          node.sizeBeforePreview ??= [...node.size];
          this.ensureImageSpace(node, img);
          this.canvas.setDirty(true, true);
        };
        img.src = event.preview;
      }
    },
    run_finished(event, node, run) {
      this.runEnded(event, run);
    },
    run_failed(event, node, run) {
      this.runEnded(event, run);
    },
    run_cancelled(event, node, run) {
      this.runEnded(event, run);
    },
    hello(event) {
      this.queueCountEl.textContent = String((event.queued ?? 0) + (event.running ?? 0));
    },
    queue(event) {
      this.queueCountEl.textContent = String((event.queued ?? 0) + (event.running ?? 0));
      this.refreshQueue();
    },
  },

  endProgress(node) {
    node.dgProgress = undefined;
    node.progressText = "";
    node.previewImage = null;
    if (node.sizeBeforePreview) {
      // the latent preview is gone: give back the room it took
      node.setSize(node.sizeBeforePreview);
      node.sizeBeforePreview = null;
    }
  },

  runEnded(event, run) {
    if (run) run.status = ENDED[event.type];
    if (event.type !== "run_cancelled") this.fetchOutputs(event.run_id);
    for (const n of this.graph._nodes) {
      if (n.runState === "queued" || n.runState === "running") n.runState = event.type === "run_cancelled" ? null : n.runState === "running" ? "error" : null;
      this.endProgress(n);
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
  },

  /** Put the workflow a past run used in a new tab, with its output images. */
  async loadRun(runId) {
    try {
      const record = await api.run(runId);
      if (!record?.workflow) return;
      this.openDocument(record.workflow, {});
      this.runs.set(runId, { tabId: this.tabs.active.id, status: record.status });
      await this.fetchOutputs(runId, record);
    } catch (error) {
      this.toast(`Cannot load run ${runId}: ${error.message}`, "error");
    }
  },

  /** Output files of a finished run with their URLs (authoritative for where images live). */
  async fetchOutputs(runId, record = null) {
    try {
      record ??= await api.run(runId);
    } catch {
      return;
    }
    const run = this.runs.get(runId);
    const tab = (run && this.tabs.byId(run.tabId)) ?? this.tabs.active;
    const byNode = new Map();
    for (const output of record?.outputs ?? []) {
      if (!byNode.has(String(output.node))) byNode.set(String(output.node), { images: [], videos: [] });
      const ui = byNode.get(String(output.node));
      if (output.kind === "video") ui.videos.push({ url: output.url, poster: output.poster ?? null });
      else ui.images.push({ url: output.url });
    }
    for (const [id, ui] of byNode) {
      const node = tab === this.tabs.active ? nodeByWorkflowId(this.graph, id) : null;
      if (node) this.setNodeUi(node, ui, tab);
      else if (tab) tab.outputs[id] = { ...(tab.outputs[id] ?? {}), ...remembered(mediaOf(ui), null) };
    }
    if (run) {
      run.fetched = true;
      rememberRuns(this.runs);
    }
    if (tab) this.tabs.touch(tab);
    this.canvas.setDirty(true, true);
  },

  /** After a reload: follow this page's runs again (live ones by events, ended ones by their outputs). */
  async resumeRuns() {
    const remembered = JSON.parse(sessionStorage.getItem(RUNS_KEY) ?? "{}");
    const ids = Object.keys(remembered);
    if (!ids.length) return;
    for (const id of ids) {
      let record;
      try {
        record = await api.run(id);
      } catch {
        continue;
      }
      const tabId = this.tabs.byId(remembered[id]) ? remembered[id] : this.tabs.active.id;
      this.runs.set(id, { tabId, status: record.status });
      if (LIVE.includes(record.status)) this.replayProgress(record, tabId);
      else if (record.status !== "cancelled") await this.fetchOutputs(id, record);
    }
    rememberRuns(this.runs);
    this.refreshQueue();
  },

  /** What a live run already did, drawn on the nodes (the rest arrives as events). */
  replayProgress(record, tabId) {
    if (tabId !== this.tabs.active.id) return;
    for (const id of record.executed ?? []) {
      const node = nodeByWorkflowId(this.graph, id);
      if (node) node.runState = "done";
    }
    for (const id of record.cached ?? []) {
      const node = nodeByWorkflowId(this.graph, id);
      if (node) node.runState = "cached";
    }
    this.canvas.setDirty(true, true);
  },

  async refreshQueue() {
    let answer;
    try {
      answer = await api.runs();
    } catch {
      return;
    }
    const active = answer?.queue ?? [];
    const runs = [...active, ...(answer?.history ?? [])].slice(0, 30);
    for (const r of runs) {
      const mine = this.runs.get(r.run_id);
      if (mine) mine.status = r.status;
    }
    this.queueCountEl.textContent = String(active.length);
    this.queueList.replaceChildren(...(runs.length ? runs.map((r) => this.queueRow(r)) : [el("div", { class: "dg-muted" }, "No runs yet.")]));
  },

  queueRow(r) {
    const id = r.run_id;
    const live = LIVE.includes(r.status);
    const when = clock(r.started ?? r.created);
    const took = live ? (r.status === "running" ? "running…" : `#${(r.position ?? 0) + 1} in line`) : duration(r.duration);
    return el(
      "div",
      { class: `dg-run dg-run-${r.status}`, "data-testid": "run", "data-run": id, "data-status": r.status, title: `${id}\nstatus: ${r.status}` },
      el("span", { class: "dg-run-status" }, r.status),
      el(
        "span",
        { class: "dg-run-main" },
        el("span", { class: "dg-run-name" }, `${r.name || "untitled"}${this.runs.has(id) ? " ·  this page" : ""}`),
        el("span", { class: "dg-run-meta", "data-testid": "run-meta" }, [when, took].filter(Boolean).join(" · ")),
      ),
      live
        ? el("button", { class: "dg-btn dg-btn-small", onclick: () => api.cancel(id).then(() => this.refreshQueue()) }, "Cancel")
        : el("button", { class: "dg-btn dg-btn-small", title: "Open the workflow this run used, with its images", onclick: () => this.loadRun(id) }, "Load"),
    );
  },
};
