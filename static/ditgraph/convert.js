// The ONE place where litegraph's in-memory graph and ditgraph's workflow JSON meet.
//
//   {"format": "ditgraph/workflow", "version": 1,
//    "nodes": {id: {"type", "inputs": {name: constant | {"from": [id, output]}}, "bypass"?, "title"?}},
//    "layout": {"nodes": {id: {"pos", "size", ...}}, "groups": [...], "viewport": {...}},
//    "meta": {...}}
//
// Inputs are keyed by name; everything about looks lives under "layout".
import { LiteGraph, LGraphGroup } from "/static/vendor/litegraph/litegraph.es.js";
import { tidyLayout } from "./layout.js";
import { BYPASS_MODE } from "./nodes.js";

export const FORMAT = "ditgraph/workflow";
export const VERSION = 1;
const SAFE_ID = /^[\w.:-]{1,100}$/;

function workflowId(node) {
  return node.properties?.wid ?? String(node.id);
}

function roundPoint(point) {
  return [Math.round(point[0]), Math.round(point[1])];
}

/** Workflow JSON for ``graph`` (+ the canvas viewport and ``meta``). */
export function graphToWorkflow(graph, { meta = {}, canvas = null } = {}) {
  const ids = new Map();
  const used = new Set();
  for (const node of graph._nodes) {
    let id = workflowId(node);
    if (used.has(id)) id = String(node.id); // a pasted copy of a node with a named id
    while (used.has(id)) id = `${id}_`;
    used.add(id);
    ids.set(node.id, id);
  }
  const nodes = {};
  const layoutNodes = {};
  for (const node of graph._nodes) {
    const id = ids.get(node.id);
    const layout = { pos: roundPoint(node.pos), size: roundPoint(node.size) };
    if (node.flags?.collapsed) layout.collapsed = true;
    if (node.color) layout.color = node.color;
    if (node.bgcolor) layout.bgcolor = node.bgcolor;
    if (node.missing) {
      nodes[id] = structuredClone(node.properties.missingData);
      layoutNodes[id] = layout;
      continue;
    }
    const def = node.def ?? node.constructor.def;
    if (!def) continue; // not a ditgraph node (nothing in the format can hold it)
    const inputs = {};
    for (const input of def.inputs) {
      const slot = node.inputs?.find((s) => s.name === input.name);
      const link = slot?.link != null ? graph.links.get?.(slot.link) ?? graph.links[slot.link] : null;
      const origin = link ? graph.getNodeById(link.origin_id) : null;
      if (origin) {
        inputs[input.name] = { from: [ids.get(origin.id), origin.outputs[link.origin_slot]?.name] };
        continue;
      }
      if (!input.widget) continue;
      const widget = node.widgets?.find((w) => w.name === input.name);
      if (!widget) continue;
      let value = widget.value;
      if (input.type === "INT" && typeof value === "number") value = Math.round(value);
      if (input.type === "BOOLEAN") value = Boolean(value);
      // an optional input without a default means "none": an empty widget must not turn it into ""
      if (!input.required && input.default === undefined && (value === "" || value === null)) continue;
      inputs[input.name] = value;
    }
    const entry = { type: def.type, inputs };
    if (node.mode === BYPASS_MODE) entry.bypass = true;
    if (node.title && node.title !== (def.display_name || def.type)) entry.title = node.title;
    nodes[id] = entry;
    const controls = {};
    for (const widget of node.widgets ?? []) {
      if (widget.seedFor && widget.value !== "fixed") controls[widget.seedFor] = widget.value;
    }
    if (Object.keys(controls).length) layout.seed_control = controls;
    layoutNodes[id] = layout;
  }
  const groups = (graph._groups ?? []).map((group) => {
    const entry = { title: group.title, bounding: [...group._bounding].map(Math.round) };
    if (group.color) entry.color = group.color;
    if (group.font_size) entry.font_size = group.font_size;
    return entry;
  });
  const layout = { nodes: layoutNodes, groups };
  if (canvas) {
    layout.viewport = { offset: roundPoint(canvas.ds.offset), scale: Math.round(canvas.ds.scale * 1000) / 1000 };
  }
  return { format: FORMAT, version: VERSION, nodes, layout, meta: { ...meta } };
}

/**
 * Replace ``graph``'s contents with workflow ``doc``. Node ids are kept: numeric ids become
 * litegraph ids, other ids are remembered in ``properties.wid``. Returns problems found while
 * loading (unknown types, unknown inputs/outputs) as strings.
 */
export function workflowToGraph(doc, graph, canvas = null) {
  const warnings = [];
  graph.clear();
  const layout = doc.layout ?? {};
  const layoutNodes = layout.nodes ?? {};
  const needsLayout = !Object.keys(layoutNodes).length; // written by hand: placed after linking
  const byId = new Map();
  const entries = Object.entries(doc.nodes ?? {});
  // numeric ids first keep their number; named ids get fresh numbers above them
  let nextId = 1 + Math.max(0, ...entries.map(([id]) => (/^\d+$/.test(id) ? Number(id) : 0)));
  for (const [id, data] of entries) {
    let node = LiteGraph.createNode(data.type);
    if (!node) {
      node = LiteGraph.createNode("ditgraph/missing");
      node.title = `${data.title ?? data.type} (missing)`;
      node.properties.missingType = String(data.type).replace(/[<>&"']/g, "?");
      node.properties.missingData = structuredClone(data);
      warnings.push(`node ${id}: unknown node type ${data.type}`);
    }
    node.id = /^\d+$/.test(id) ? Number(id) : nextId++;
    // named ids are kept; anything that is not a plain name is renumbered (litegraph puts
    // properties into menus as HTML, so a hostile file must not smuggle markup in here)
    if (!/^\d+$/.test(id) && SAFE_ID.test(id)) node.properties.wid = id;
    const look = layoutNodes[id] ?? {};
    node.pos = [...(look.pos ?? [100, 100])];
    if (look.size) node.size = [...look.size];
    if (look.collapsed) node.flags.collapsed = true;
    if (look.color) node.color = look.color;
    if (look.bgcolor) node.bgcolor = look.bgcolor;
    if (data.title) node.title = data.title;
    if (data.bypass) node.mode = BYPASS_MODE;
    graph.add(node, true);
    byId.set(id, node);
    if (node.missing) continue;
    for (const [name, value] of Object.entries(data.inputs ?? {})) {
      if (value && typeof value === "object" && !Array.isArray(value) && "from" in value) continue;
      const widget = node.widgets?.find((w) => w.name === name);
      if (widget) widget.value = value;
      else warnings.push(`node ${id}: ${data.type} has no widget ${name}`);
    }
    for (const [name, mode] of Object.entries(look.seed_control ?? {})) {
      const control = node.widgets?.find((w) => w.seedFor === name);
      if (control) control.value = mode;
    }
  }
  for (const [id, data] of entries) {
    const target = byId.get(id);
    if (target.missing) continue;
    for (const [name, value] of Object.entries(data.inputs ?? {})) {
      if (!(value && typeof value === "object" && !Array.isArray(value) && "from" in value)) continue;
      const [sourceId, outputName] = value.from;
      const source = byId.get(String(sourceId));
      if (!source || source.missing) {
        warnings.push(`node ${id}: input ${name} links to missing node ${sourceId}`);
        continue;
      }
      const out = source.findOutputSlot(String(outputName));
      const inp = target.findInputSlot(name);
      if (out < 0 || inp < 0 || !source.connect(out, target, inp)) {
        warnings.push(`node ${id}: cannot link ${name} from ${sourceId}.${outputName}`);
      }
    }
  }
  for (const look of layout.groups ?? []) {
    const group = new LGraphGroup(look.title ?? "Group");
    if (look.bounding) group._bounding.set(look.bounding);
    if (look.color) group.color = look.color;
    if (look.font_size) group.font_size = look.font_size;
    graph.add(group);
  }
  if (needsLayout) tidyLayout(graph);
  graph.updateExecutionOrder();
  if (canvas && layout.viewport) {
    const { offset, scale } = layout.viewport;
    if (offset) canvas.ds.offset = [...offset];
    if (scale) canvas.ds.scale = scale;
  }
  graph.setDirtyCanvas(true, true);
  return warnings;
}

/** Which litegraph node a workflow id refers to. */
export function nodeByWorkflowId(graph, id) {
  id = String(id);
  return graph._nodes.find((n) => workflowId(n) === id) ?? null;
}

export { workflowId };
