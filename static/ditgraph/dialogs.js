// Modal dialogs of the editor: name prompt, choices (close a dirty tab), the Open dialog,
// the image lightbox and the keyboard-shortcut sheet. Escape closes the top one.
// Installed on the Editor's prototype.
import { api } from "./api.js";
import { el } from "./palette.js";

export const SHORTCUTS = [
  ["Ctrl+Enter", "Run the workflow"],
  ["Ctrl+S / Ctrl+Shift+S", "Save / save as"],
  ["Ctrl+O", "Open a workflow (in a new tab)"],
  ["Ctrl+Z / Ctrl+Shift+Z, Ctrl+Y", "Undo / redo (per tab; images stay)"],
  ["Ctrl+B", "Bypass the selected nodes"],
  ["Ctrl+G", "Group the selected nodes"],
  ["Ctrl+C / Ctrl+V", "Copy / paste nodes"],
  ["Delete", "Delete the selected nodes"],
  ["Double-click canvas", "Search and add a node"],
  ["Double-click node", "Open its images large"],
  ["Alt+W / Alt+T", "Close this tab / new tab"],
  ["Alt+← / Alt+→", "Previous / next tab"],
  ["Escape", "Close menus, dialogs and the lightbox"],
  ["?", "This sheet"],
];

export const dialogMethods = {
  /** Show ``content`` in a modal; returns its close function (Escape and a click outside close it). */
  modal(content, { onClose = null, testid = null, cls = "" } = {}) {
    const close = () => {
      if (!box.isConnected) return;
      box.remove();
      this.modals = this.modals.filter((m) => m !== close);
      onClose?.();
    };
    const box = el("div", { class: `dg-modal ${cls}`, ...(testid ? { "data-testid": testid } : {}), onclick: (e) => e.target === box && close() }, content);
    this.app.append(box);
    this.modals.push(close);
    return close;
  },

  /** Close the top dialog or menu; true if something was closed. */
  closeTop() {
    const menus = document.querySelectorAll(".litecontextmenu");
    if (menus.length) {
      menus.forEach((m) => m.remove());
      return true;
    }
    if (this.search.box.style.display !== "none") {
      this.search.close();
      return true;
    }
    const close = this.modals.at(-1);
    if (close) close();
    return Boolean(close);
  },

  async ask(title, value = "") {
    return new Promise((resolve) => {
      const input = el("input", { class: "dg-input", value, "data-testid": "prompt-input" });
      let result = null;
      const finish = (answer) => {
        result = answer;
        close();
      };
      const close = this.modal(
        el(
          "div",
          { class: "dg-dialog", "data-testid": "prompt-dialog" },
          el("div", { class: "dg-panel-title" }, title),
          input,
          el(
            "div",
            { class: "dg-dialog-buttons" },
            el("button", { class: "dg-btn", onclick: () => finish(null) }, "Cancel"),
            el("button", { class: "dg-btn dg-btn-primary", "data-testid": "prompt-ok", onclick: () => finish(input.value.trim() || null) }, "OK"),
          ),
        ),
        { onClose: () => resolve(result) },
      );
      input.addEventListener("keydown", (e) => {
        e.stopPropagation();
        if (e.key === "Enter") finish(input.value.trim() || null);
        if (e.key === "Escape") finish(null);
      });
      input.focus();
      input.select();
    });
  },

  /** Ask ``message`` with ``buttons`` ([value, label, class?]); resolves to the value (null: dismissed). */
  async choose(message, buttons) {
    return new Promise((resolve) => {
      let result = null;
      const close = this.modal(
        el(
          "div",
          { class: "dg-dialog", "data-testid": "choice-dialog" },
          el("div", {}, message),
          el(
            "div",
            { class: "dg-dialog-buttons" },
            ...buttons.map(([value, label, cls = ""]) =>
              el("button", { class: `dg-btn ${cls}`, "data-testid": `choice-${value}`, onclick: () => ((result = value), close()) }, label),
            ),
          ),
        ),
        { onClose: () => resolve(result) },
      );
    });
  },

  async openDialog() {
    const list = el("div", { class: "dg-open-list" }, "Loading…");
    const close = this.modal(
      el(
        "div",
        { class: "dg-dialog dg-dialog-wide", "data-testid": "open-dialog" },
        el("div", { class: "dg-panel-title" }, "Open workflow (in a new tab)", el("span", { class: "dg-grow" }), el("button", { class: "dg-btn dg-btn-small", onclick: () => close() }, "✕")),
        list,
      ),
    );
    let items = [];
    let failure = null;
    try {
      const answer = await api.workflows();
      items = Array.isArray(answer) ? answer : answer?.workflows ?? [];
    } catch (error) {
      failure = error.message;
    }
    const saved = items.filter((i) => (i.source ?? "user") === "user");
    const examples = items.filter((i) => i.source === "shipped");
    list.replaceChildren(el("div", { class: "dg-open-heading" }, "Your workflows"));
    if (failure) list.append(el("div", { class: "dg-muted" }, failure));
    else if (!saved.length) list.append(el("div", { class: "dg-muted" }, "None saved yet."));
    for (const { name } of saved) {
      const remove = async () => {
        if ((await this.choose(`Delete workflow “${name}”?`, [["cancel", "Keep"], ["delete", "Delete", "dg-btn-danger"]])) !== "delete") return;
        await api.deleteWorkflow(name).catch((e) => this.toast(e.message, "error"));
        close();
        this.openDialog();
      };
      list.append(
        el(
          "div",
          { class: "dg-open-item", "data-testid": "saved-workflow", "data-name": name },
          el("span", { class: "dg-open-name", onclick: () => (close(), this.openWorkflow(name)) }, name),
          el("button", { class: "dg-btn dg-btn-small", title: "Delete", onclick: remove }, "Delete"),
        ),
      );
    }
    list.append(el("div", { class: "dg-open-heading" }, "Examples shipped with ditgraph"));
    for (const { name } of examples) {
      list.append(
        el(
          "div",
          { class: "dg-open-item", "data-testid": "example-workflow", "data-name": name },
          el("span", { class: "dg-open-name", onclick: () => (close(), this.openExample(name)) }, name),
        ),
      );
    }
  },

  /** A lightbox with a node's images at full size (double-click the node). */
  showImages(urls) {
    const media = (url) =>
      /\.(mp4|webm)(\?|$)/i.test(url)
        ? el("video", { src: url, controls: "", autoplay: "", loop: "", muted: "", onclick: (e) => e.stopPropagation() })
        : el("a", { href: url, target: "_blank", onclick: (e) => e.stopPropagation() }, el("img", { src: url }));
    const close = this.modal(el("div", { class: "dg-lightbox-items", onclick: () => close() }, ...urls.map(media)), { testid: "lightbox", cls: "dg-lightbox" });
  },

  showShortcuts() {
    const rows = SHORTCUTS.map(([keys, what]) => el("tr", {}, el("td", { class: "dg-keys" }, keys), el("td", {}, what)));
    const close = this.modal(
      el(
        "div",
        { class: "dg-dialog", "data-testid": "shortcuts" },
        el("div", { class: "dg-panel-title" }, "Keyboard shortcuts", el("span", { class: "dg-grow" }), el("button", { class: "dg-btn dg-btn-small", onclick: () => close() }, "✕")),
        el("table", { class: "dg-shortcuts" }, ...rows),
      ),
    );
  },
};
