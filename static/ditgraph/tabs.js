// Workflow tabs: several open workflows, each with its own undo history, dirty marker and
// output previews. Every tab is autosaved to the server (/api/drafts/<workspace>/<tab>) and
// comes back after a reload or a crash; closing a dirty tab asks first.
import { api } from "./api.js";
import { el } from "./palette.js";

const WORKSPACE_KEY = "ditgraph.workspace";
const ACTIVE_KEY = "ditgraph.activeTab";
const AUTOSAVE_MS = 600;
const SESSION_DRAFT = "ditgraph.draft.";

function newId(prefix) {
  const random = crypto.randomUUID ? crypto.randomUUID().replaceAll("-", "") : Math.random().toString(16).slice(2);
  return `${prefix}${random.slice(0, 20)}`;
}

/** This browser profile's workspace id (drafts are kept per workspace). */
export function workspaceId() {
  let id = localStorage.getItem(WORKSPACE_KEY);
  if (!id) {
    id = newId("w");
    localStorage.setItem(WORKSPACE_KEY, id);
  }
  return id;
}

export class Tab {
  constructor({ id = newId("t"), doc, name = null, outputs = {}, dirty = false }) {
    this.id = id;
    this.doc = doc; // the workflow as last captured (with layout and viewport)
    this.name = name; // the saved user workflow it edits; null: not saved yet
    this.meta = { ...(doc.meta ?? {}) };
    this.outputs = outputs; // workflow node id -> the node's last "ui" (images, text)
    this.history = null; // created when the tab is first shown (snapshots need the graph)
    this.restoredDirty = dirty;
  }

  get title() {
    return this.name ?? this.meta.name ?? "untitled";
  }

  get dirty() {
    if (!this.history) return this.restoredDirty;
    return this.history.dirty || Boolean(this.stack?.some((frame) => frame.parentHistory?.dirty));
  }

  get empty() {
    return !Object.keys(this.doc.nodes ?? {}).length;
  }
}

export class Tabs {
  constructor(editor) {
    this.editor = editor;
    this.workspace = workspaceId();
    this.list = [];
    this.active = null;
    this.timers = new Map();
    this.bar = el("div", { class: "dg-tabs", "data-testid": "tabs" });
  }

  /** Open ``doc`` in a new tab (or in the current one when that is an untouched empty tab). */
  open(doc, { name = null, outputs = {} } = {}) {
    const reuse = this.active && this.active.empty && !this.active.dirty && !this.editor.graph._nodes.length;
    const tab = new Tab({ doc, name, outputs });
    if (reuse) {
      const index = this.list.indexOf(this.active);
      this.forget(this.active);
      this.list.splice(index, 0, tab);
      this.active = null;
    } else {
      this.list.push(tab);
    }
    this.select(tab);
    return tab;
  }

  select(tab) {
    if (this.active === tab) return;
    if (this.active) this.editor.captureTab(this.active);
    this.active = tab;
    sessionStorage.setItem(ACTIVE_KEY, tab.id);
    this.editor.showTab(tab);
    this.render();
    this.touch(tab);
  }

  async close(tab) {
    if (tab.dirty) {
      const answer = await this.editor.choose(`“${tab.title}” has unsaved changes.`, [
        ["cancel", "Keep it open"],
        ["discard", "Close without saving", "dg-btn-danger"],
      ]);
      if (answer !== "discard") return false;
    }
    const index = this.list.indexOf(tab);
    this.forget(tab);
    this.list.splice(index, 1);
    if (this.active === tab) {
      this.active = null;
      if (this.list.length) this.select(this.list[Math.min(index, this.list.length - 1)]);
      else this.editor.newWorkflow();
    }
    this.render();
    return true;
  }

  forget(tab) {
    clearTimeout(this.timers.get(tab.id));
    this.timers.delete(tab.id);
    sessionStorage.removeItem(`${SESSION_DRAFT}${tab.id}`);
    api.deleteDraft(this.workspace, tab.id).catch(() => null);
  }

  /** Autosave ``tab`` soon (debounced per tab). */
  touch(tab = this.active) {
    if (!tab) return;
    clearTimeout(this.timers.get(tab.id));
    this.timers.set(tab.id, setTimeout(() => this.autosave(tab), AUTOSAVE_MS));
    this.render();
  }

  draft(tab) {
    const workflow = tab === this.active ? this.editor.workflow() : tab.doc;
    return { id: tab.id, name: tab.name, position: this.list.indexOf(tab), dirty: tab.dirty, workflow, outputs: tab.outputs, updated: Date.now() };
  }

  async autosave(tab, keepalive = false) {
    clearTimeout(this.timers.get(tab.id));
    this.timers.delete(tab.id);
    if (!this.list.includes(tab)) return;
    const draft = this.draft(tab);
    if (keepalive) sessionStorage.setItem(`${SESSION_DRAFT}${tab.id}`, JSON.stringify(draft));
    try {
      await api.putDraft(this.workspace, tab.id, draft, keepalive);
      tab.autosaved = draft.updated;
    } catch {
      // the server is away: the next edit tries again
    }
  }

  /** Save every pending tab now (the page is going away): also into sessionStorage, which a
   * reload reads first, since the browser may drop a request of a closing page. */
  flush() {
    for (const tab of this.list) if (this.timers.has(tab.id)) this.autosave(tab, true);
  }

  /** Drafts written at the last page exit that are newer than the server's copies. */
  sessionDrafts(drafts) {
    const byId = new Map(drafts.map((d) => [d.id, d]));
    for (let i = sessionStorage.length - 1; i >= 0; i--) {
      const key = sessionStorage.key(i);
      if (!key?.startsWith(SESSION_DRAFT)) continue;
      try {
        const draft = JSON.parse(sessionStorage.getItem(key));
        if (!byId.has(draft.id) || (byId.get(draft.id).updated ?? 0) < draft.updated) byId.set(draft.id, draft);
      } catch {
        // unreadable: the server's copy stands
      }
      sessionStorage.removeItem(key);
    }
    return [...byId.values()].sort((a, b) => (a.position ?? 0) - (b.position ?? 0));
  }

  /** Reopen this workspace's autosaved tabs; false when there were none. */
  async restore() {
    let drafts = [];
    try {
      drafts = (await api.drafts(this.workspace)).drafts ?? [];
    } catch {
      // the server is away: what this page left in sessionStorage still comes back
    }
    drafts = this.sessionDrafts(drafts).filter((d) => d?.workflow?.format === "ditgraph/workflow");
    if (!drafts.length) return false;
    this.list = drafts.map((d) => new Tab({ id: d.id, doc: d.workflow, name: d.name ?? null, outputs: d.outputs ?? {}, dirty: Boolean(d.dirty) }));
    const wanted = sessionStorage.getItem(ACTIVE_KEY);
    this.select(this.list.find((t) => t.id === wanted) ?? this.list[0]);
    return true;
  }

  byId(id) {
    return this.list.find((t) => t.id === id) ?? null;
  }

  render() {
    this.bar.replaceChildren(
      ...this.list.map((tab) =>
        el(
          "div",
          {
            class: `dg-tab${tab === this.active ? " active" : ""}`,
            "data-testid": "tab",
            "data-tab": tab.id,
            "data-dirty": tab.dirty ? "1" : "0",
            title: tab.title,
            onclick: () => this.select(tab),
            onauxclick: (e) => e.button === 1 && this.close(tab),
          },
          el("span", { class: "dg-tab-name" }, tab.title),
          el("span", { class: "dg-tab-dirty", title: "Unsaved changes" }, tab.dirty ? "●" : ""),
          el(
            "button",
            { class: "dg-tab-close", title: "Close this tab", "data-testid": "tab-close", onclick: (e) => (e.stopPropagation(), this.close(tab)) },
            "×",
          ),
        ),
      ),
      el("button", { class: "dg-tab-new", title: "New workflow in a new tab", "data-testid": "tab-new", onclick: () => this.editor.newWorkflow() }, "+"),
    );
  }
}
