// Subgraphs (workflow format version 2, docs/workflow-format.md): a workflow's "subgraphs"
// hold definitions; a node of type "subgraph:NAME" is an instance. The editor keeps the
// definitions of each tab, shows instances as nodes with the definition's sockets and
// widgets, converts a selection into a subgraph and unpacks an instance back into its nodes.
// Installed on the Editor's prototype.
import { graphToWorkflow, workflowId } from "./convert.js";
import { History } from "./history.js";
import { registerCatalogue, WIDGET_TYPES } from "./nodes.js";
import { el } from "./palette.js";

export const PREFIX = "subgraph:";
const IN = "@in";
const isLink = (v) => v && typeof v === "object" && !Array.isArray(v) && Array.isArray(v.from);

/** The type of output ``[nodeId, output]`` inside ``def`` (inner node, nested instance or @in). */
function outputType(editor, subgraphs, def, [nodeId, output], seen = new Set()) {
  if (nodeId === IN) return def.inputs?.[output]?.type ?? "*";
  const inner = def.nodes?.[nodeId];
  if (!inner) return "*";
  if (inner.type?.startsWith(PREFIX)) {
    const name = inner.type.slice(PREFIX.length);
    const nested = subgraphs[name];
    if (!nested || seen.has(name)) return "*";
    const from = nested.outputs?.[output]?.from;
    return from ? outputType(editor, subgraphs, nested, from, new Set([...seen, name])) : "*";
  }
  const entry = editor.catalogue.find((d) => d.type === inner.type);
  return entry?.outputs.find((o) => o.name === output)?.type ?? "*";
}

/** A catalogue entry for instances of subgraph ``name`` (what nodes.js builds node classes from). */
function catalogueEntry(editor, subgraphs, name) {
  const def = subgraphs[name];
  const inputs = Object.entries(def.inputs ?? {}).map(([input, spec]) => ({
    name: input,
    type: spec.type ?? "*",
    required: spec.default === undefined,
    widget: WIDGET_TYPES.has(spec.type),
    ...(spec.default !== undefined ? { default: spec.default } : {}),
    ...(spec.tooltip ? { tooltip: spec.tooltip } : {}),
  }));
  const outputs = Object.entries(def.outputs ?? {}).map(([output, spec]) => ({ name: output, type: outputType(editor, subgraphs, def, spec.from ?? []) }));
  return { type: `${PREFIX}${name}`, display_name: `${name} (subgraph)`, category: "subgraphs", description: def.description ?? "", inputs, outputs, subgraph: name };
}

/** Ids that are not in ``used``: ``base``, else base_2, base_3, ... */
function freshId(base, used) {
  let id = String(base).replace(/[^\w.:-]/g, "_");
  for (let i = 2; used.has(id); i++) id = `${base}_${i}`;
  used.add(id);
  return id;
}

function bbox(layoutNodes, ids) {
  const points = ids.map((id) => layoutNodes?.[id]?.pos).filter(Boolean);
  if (!points.length) return [0, 0];
  return [Math.min(...points.map((p) => p[0])), Math.min(...points.map((p) => p[1]))];
}

/** ``def`` with its nodes and layout taken from ``inner`` (the edited inside); the instance
 * input links (@in) the editor hid come back where the input was not linked meanwhile. */
function definitionFrom(def, inner, hidden) {
  const nodes = structuredClone(inner.nodes);
  for (const [nodeId, input, name] of hidden) {
    if (nodes[nodeId] && !isLink(nodes[nodeId].inputs?.[input])) (nodes[nodeId].inputs ??= {})[input] = { from: [IN, name] };
  }
  const outputs = Object.fromEntries(Object.entries(def.outputs ?? {}).filter(([, o]) => o.from?.[0] === IN || nodes[o.from?.[0]]));
  return { ...def, nodes, outputs, layout: { ...(def.layout ?? {}), nodes: inner.layout.nodes, groups: inner.layout.groups } };
}

export const subgraphMethods = {
  /** Edit the definition of an instance in place (a breadcrumb leads back). */
  openSubgraph(node) {
    const name = node.type.slice(PREFIX.length);
    const def = this.tab.subgraphs?.[name];
    if (!def) return false;
    this.flushChange();
    const parentDoc = this.withSubgraphs(graphToWorkflow(this.graph, { meta: this.tab.meta, canvas: this.canvas }));
    const hidden = [];
    const nodes = structuredClone(def.nodes ?? {});
    for (const [nodeId, data] of Object.entries(nodes)) {
      for (const [input, value] of Object.entries(data.inputs ?? {})) {
        if (isLink(value) && value.from[0] === IN) {
          hidden.push([nodeId, input, value.from[1]]);
          delete data.inputs[input]; // fed by the instance: shown unlinked while editing inside
        }
      }
    }
    const inner = { format: parentDoc.format, version: parentDoc.version, nodes, layout: { nodes: def.layout?.nodes ?? {}, groups: def.layout?.groups ?? [] }, meta: this.tab.meta, subgraphs: parentDoc.subgraphs };
    (this.tab.stack ??= []).push({ name, parentDoc, hidden, parentHistory: this.tab.history });
    this.loadGraph(inner);
    this.fitView();
    this.tab.history = new History(this.snapshot());
    this.afterGraphLoad(this.tab);
    this.renderCrumbs();
    return true;
  },

  /** The whole workflow while a definition is open: the levels below with the open insides put back. */
  composedWorkflow(current) {
    const subgraphs = structuredClone(this.tab.subgraphs ?? {});
    let doc = current;
    for (const frame of [...this.tab.stack].reverse()) {
      subgraphs[frame.name] = definitionFrom(subgraphs[frame.name] ?? {}, doc, frame.hidden);
      doc = structuredClone(frame.parentDoc);
    }
    doc.subgraphs = subgraphs;
    doc.version = Math.max(doc.version, 2);
    return doc;
  },

  /** Leave the open definition (one level up); the change is one undoable step there. */
  closeSubgraph() {
    const frame = this.tab.stack?.at(-1);
    if (!frame) return false;
    this.flushChange();
    const inner = graphToWorkflow(this.graph, { meta: this.tab.meta });
    const subgraphs = structuredClone(this.tab.subgraphs ?? {});
    subgraphs[frame.name] = definitionFrom(subgraphs[frame.name] ?? {}, inner, frame.hidden);
    this.tab.stack.pop();
    const doc = { ...structuredClone(frame.parentDoc), subgraphs };
    this.tab.history = frame.parentHistory;
    this.loadGraph(doc);
    this.afterGraphLoad(this.tab);
    this.renderCrumbs();
    this.changed("subgraph edited");
    return true;
  },

  closeAllSubgraphs() {
    while (this.tab?.stack?.length) this.closeSubgraph();
    this.flushChange();
  },

  renderCrumbs() {
    const stack = this.tab?.stack ?? [];
    this.crumbs.style.display = stack.length ? "" : "none";
    const up = (levels) => () => {
      for (let i = 0; i < levels; i++) this.closeSubgraph();
    };
    this.crumbs.replaceChildren(
      el("span", { class: "dg-crumb", "data-testid": "crumb", onclick: up(stack.length) }, this.tab?.title ?? "workflow"),
      ...stack.flatMap((frame, i) => [" › ", el("span", { class: "dg-crumb", "data-testid": "crumb", onclick: up(stack.length - 1 - i) }, frame.name)]),
    );
  },

  /** Node classes for the definitions of ``subgraphs`` (before a document with instances loads). */
  registerSubgraphs(subgraphs = {}) {
    const entries = Object.keys(subgraphs).map((name) => catalogueEntry(this, subgraphs, name));
    if (entries.length) registerCatalogue(entries, this);
  },

  /** Replace the selected nodes by one instance of a new subgraph made of them. */
  async convertToSubgraph(nodes = this.selectedNodes()) {
    nodes = nodes.filter((n) => !n.missing);
    if (!nodes.length) return null;
    const subgraphs = { ...(this.tab.subgraphs ?? {}) };
    const name = await this.ask("Name of the new subgraph", "Subgraph");
    if (!name) return null;
    if (subgraphs[name] || !/^[\w .()+-]{1,80}$/.test(name)) {
      this.toast(`“${name}” is taken or not a plain name`, "error");
      return null;
    }
    const doc = this.workflow();
    const inside = new Set(nodes.map((n) => workflowId(n)));
    const def = { inputs: {}, outputs: {}, nodes: {}, layout: { nodes: {} } };
    const instance = { type: `${PREFIX}${name}`, inputs: {} };
    const outerInput = new Map(); // "src|output" -> subgraph input name
    for (const id of inside) {
      const inner = structuredClone(doc.nodes[id]);
      const entry = this.catalogue.find((d) => d.type === inner.type);
      for (const [input, value] of Object.entries(inner.inputs ?? {})) {
        if (!isLink(value) || inside.has(String(value.from[0]))) continue;
        const key = value.from.join("|");
        if (!outerInput.has(key)) {
          const inName = freshId(input, new Set(Object.keys(def.inputs)));
          outerInput.set(key, inName);
          def.inputs[inName] = { type: entry?.inputs.find((i) => i.name === input)?.type ?? "*" };
          instance.inputs[inName] = value;
        }
        inner.inputs[input] = { from: [IN, outerInput.get(key)] };
      }
      def.nodes[id] = inner;
      def.layout.nodes[id] = doc.layout.nodes[id];
    }
    const used = new Set(Object.keys(doc.nodes));
    const instanceId = freshId(String(1 + Math.max(0, ...[...used].filter((k) => /^\d+$/.test(k)).map(Number))), used);
    const exposed = new Map(); // "src|output" -> subgraph output name
    for (const [id, node] of Object.entries(doc.nodes)) {
      if (inside.has(id)) continue;
      for (const [input, value] of Object.entries(node.inputs ?? {})) {
        if (!isLink(value) || !inside.has(String(value.from[0]))) continue;
        const key = value.from.join("|");
        if (!exposed.has(key)) {
          const outName = freshId(value.from[1], new Set(Object.keys(def.outputs)));
          exposed.set(key, outName);
          def.outputs[outName] = { from: [String(value.from[0]), value.from[1]] };
        }
        node.inputs[input] = { from: [instanceId, exposed.get(key)] };
      }
    }
    for (const id of inside) {
      delete doc.nodes[id];
      delete doc.layout.nodes[id];
    }
    doc.nodes[instanceId] = instance;
    doc.layout.nodes[instanceId] = { pos: bbox(def.layout.nodes, [...inside]) };
    subgraphs[name] = def;
    doc.subgraphs = subgraphs;
    this.replaceGraph(doc, "subgraph");
    return instanceId;
  },

  /** Put an instance's inner nodes in its place (links and constants rewired). */
  unpackSubgraph(node) {
    const doc = this.workflow();
    const id = workflowId(node);
    const instance = doc.nodes[id];
    const def = doc.subgraphs?.[instance?.type?.slice(PREFIX.length)];
    if (!def) return false;
    const used = new Set(Object.keys(doc.nodes));
    const ids = Object.fromEntries(Object.keys(def.nodes ?? {}).map((inner) => [inner, freshId(`${id}-${inner}`, used)]));
    const resolve = ([source, output]) => {
      if (source !== IN) return { from: [ids[source], output] };
      const given = instance.inputs?.[output];
      return given !== undefined ? given : def.inputs?.[output]?.default;
    };
    const [x0, y0] = bbox(def.layout?.nodes, Object.keys(ids));
    const at = doc.layout.nodes[id]?.pos ?? [0, 0];
    for (const [inner, data] of Object.entries(def.nodes ?? {})) {
      const copy = structuredClone(data);
      for (const [input, value] of Object.entries(copy.inputs ?? {})) {
        if (!isLink(value)) continue;
        const resolved = resolve(value.from);
        if (resolved === undefined) delete copy.inputs[input];
        else copy.inputs[input] = resolved;
      }
      doc.nodes[ids[inner]] = copy;
      const look = structuredClone(def.layout?.nodes?.[inner] ?? {});
      look.pos = look.pos ? [at[0] + look.pos[0] - x0, at[1] + look.pos[1] - y0] : [...at];
      doc.layout.nodes[ids[inner]] = look;
    }
    for (const other of Object.values(doc.nodes)) {
      for (const [input, value] of Object.entries(other.inputs ?? {})) {
        if (isLink(value) && String(value.from[0]) === id) {
          const exposed = def.outputs?.[value.from[1]]?.from;
          const resolved = exposed ? resolve(exposed) : undefined;
          if (resolved === undefined) delete other.inputs[input];
          else other.inputs[input] = resolved;
        }
      }
    }
    delete doc.nodes[id];
    delete doc.layout.nodes[id];
    this.replaceGraph(doc, "unpack");
    return true;
  },

  /** Show ``doc`` in the current tab as one undoable edit (the view stays where it is). */
  replaceGraph(doc, reason) {
    const viewport = { offset: [...this.canvas.ds.offset], scale: this.canvas.ds.scale };
    this.loadGraph(doc);
    this.canvas.ds.offset = viewport.offset;
    this.canvas.ds.scale = viewport.scale;
    this.afterGraphLoad(this.tab);
    this.changed(reason);
  },
};
