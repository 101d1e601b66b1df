// The node palette (search, categories, drag onto the canvas) and the double-click search popup.

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export { el };

/** Score how well ``def`` matches ``query`` (0 = no match); words may match in any field. */
export function matchScore(def, query) {
  const q = query.trim().toLowerCase();
  if (!q) return 1;
  const name = (def.display_name || def.type).toLowerCase();
  const type = def.type.toLowerCase();
  const hay = `${name} ${type} ${def.category} ${def.description ?? ""} ${def.inputs.map((i) => i.type).join(" ")} ${def.outputs.map((o) => o.type).join(" ")}`.toLowerCase();
  let score = 0;
  for (const word of q.split(/\s+/)) {
    if (name.startsWith(word) || type.startsWith(word)) score += 10;
    else if (name.includes(word) || type.includes(word)) score += 6;
    else if (hay.includes(word)) score += 1;
    else return 0;
  }
  return score;
}

export class Palette {
  constructor(container, editor) {
    this.editor = editor;
    this.search = el("input", {
      class: "dg-input dg-palette-search",
      type: "search",
      placeholder: "Search nodes…",
      "data-testid": "palette-search",
      oninput: () => this.render(),
    });
    this.list = el("div", { class: "dg-palette-list" });
    container.append(el("div", { class: "dg-panel-title" }, "Nodes"), this.search, this.list);
    // categories start folded; the ones the user opened are remembered
    this.opened = new Set(JSON.parse(localStorage.getItem("ditgraph.palette.open") ?? "[]"));
  }

  setCatalogue(catalogue) {
    this.catalogue = catalogue;
    this.render();
  }

  render() {
    const query = this.search.value;
    const groups = new Map();
    for (const def of this.catalogue) {
      if (!matchScore(def, query)) continue;
      const category = def.category || "misc";
      if (!groups.has(category)) groups.set(category, []);
      groups.get(category).push(def);
    }
    this.list.replaceChildren();
    for (const category of [...groups.keys()].sort()) {
      const open = Boolean(query) || this.opened.has(category);
      const header = el(
        "div",
        {
          class: `dg-category${open ? " open" : ""}`,
          onclick: () => {
            if (this.opened.has(category)) this.opened.delete(category);
            else this.opened.add(category);
            localStorage.setItem("ditgraph.palette.open", JSON.stringify([...this.opened]));
            this.render();
          },
        },
        el("span", { class: "dg-caret" }, open ? "▾" : "▸"),
        category,
        el("span", { class: "dg-count" }, groups.get(category).length),
      );
      this.list.append(header);
      if (!open) continue;
      for (const def of groups.get(category)) {
        const item = el(
          "div",
          {
            class: "dg-palette-item",
            "data-type": def.type,
            title: def.description || def.type,
          },
          def.display_name || def.type,
        );
        item.addEventListener("pointerdown", (e) => this.startDrag(e, def));
        this.list.append(item);
      }
    }
  }

  /** Pointer-driven drag: a ghost follows the pointer; releasing over the canvas adds the node. */
  startDrag(event, def) {
    if (event.button !== 0) return;
    event.preventDefault();
    const start = [event.clientX, event.clientY];
    let ghost = null;
    const move = (e) => {
      if (!ghost && Math.hypot(e.clientX - start[0], e.clientY - start[1]) > 4) {
        ghost = el("div", { class: "dg-drag-ghost" }, def.display_name || def.type);
        document.body.append(ghost);
      }
      if (ghost) {
        ghost.style.left = `${e.clientX + 8}px`;
        ghost.style.top = `${e.clientY + 8}px`;
      }
    };
    const up = (e) => {
      window.removeEventListener("pointermove", move, true);
      window.removeEventListener("pointerup", up, true);
      if (ghost) {
        ghost.remove();
        if (this.editor.isOverCanvas(e.clientX, e.clientY)) {
          this.editor.addNodeAtClient(def.type, e.clientX, e.clientY);
        }
      } else {
        this.editor.addNodeAtCenter(def.type); // a plain click adds it in view
      }
    };
    // capture phase: the canvas stops propagation of its own pointer events
    window.addEventListener("pointermove", move, true);
    window.addEventListener("pointerup", up, true);
  }
}

/** ComfyUI-style search popup (double-click on the canvas, or a wire dropped on empty space). */
export class SearchPopup {
  constructor(editor) {
    this.editor = editor;
    this.input = el("input", { class: "dg-input", placeholder: "Search nodes…", "data-testid": "search-input" });
    this.results = el("div", { class: "dg-search-results" });
    this.box = el("div", { class: "dg-search", "data-testid": "search-popup" }, this.input, this.results);
    this.box.style.display = "none";
    document.body.append(this.box);
    this.input.addEventListener("input", () => this.render());
    this.input.addEventListener("keydown", (e) => this.key(e));
    this.input.addEventListener("blur", () => setTimeout(() => this.close(), 150));
  }

  open(clientX, clientY, filter = null) {
    this.at = [clientX, clientY];
    this.filter = filter; // {input: type} or {output: type}: only nodes that can take the dropped wire
    this.box.style.display = "block";
    this.box.style.left = `${Math.min(clientX, window.innerWidth - 340)}px`;
    this.box.style.top = `${Math.min(clientY, window.innerHeight - 380)}px`;
    this.input.value = "";
    this.selected = 0;
    this.render();
    this.input.focus();
  }

  close() {
    this.box.style.display = "none";
    this.filter = null;
  }

  candidates() {
    const query = this.input.value;
    const { accepts } = this.editor;
    let defs = this.editor.catalogue.filter((def) => {
      if (!this.filter) return true;
      if (this.filter.outputType) return def.inputs.some((i) => accepts(i.type, this.filter.outputType));
      if (this.filter.inputType) return def.outputs.some((o) => accepts(this.filter.inputType, o.type));
      return true;
    });
    defs = defs.map((def) => [matchScore(def, query), def]).filter(([s]) => s > 0);
    defs.sort((a, b) => b[0] - a[0] || (a[1].display_name || a[1].type).localeCompare(b[1].display_name || b[1].type));
    return defs.slice(0, 40).map(([, def]) => def);
  }

  render() {
    this.items = this.candidates();
    this.selected = Math.min(this.selected, Math.max(0, this.items.length - 1));
    this.results.replaceChildren(
      ...this.items.map((def, i) =>
        el(
          "div",
          {
            class: `dg-search-item${i === this.selected ? " selected" : ""}`,
            "data-type": def.type,
            onmousedown: (e) => {
              e.preventDefault();
              this.choose(def);
            },
          },
          el("span", {}, def.display_name || def.type),
          el("span", { class: "dg-search-cat" }, def.category),
        ),
      ),
    );
  }

  key(e) {
    if (e.key === "ArrowDown") this.selected = Math.min(this.selected + 1, this.items.length - 1);
    else if (e.key === "ArrowUp") this.selected = Math.max(this.selected - 1, 0);
    else if (e.key === "Enter") {
      if (this.items[this.selected]) this.choose(this.items[this.selected]);
      return;
    } else if (e.key === "Escape") {
      this.close();
      return;
    } else return;
    e.preventDefault();
    this.render();
  }

  choose(def) {
    const filter = this.filter;
    this.close();
    const node = this.editor.addNodeAtClient(def.type, this.at[0], this.at[1]);
    if (node && filter?.connect) filter.connect(node);
  }
}
