// Automatic placement: columns by dependency depth (sources left), ordered to keep wires short,
// sized by what the editor computes for each node, wrapped into a second band when a graph is
// wider than ``maxWidth`` so a whole workflow stays readable at the default zoom.
import { LiteGraph } from "/static/vendor/litegraph/litegraph.es.js";

const GAP_X = 50;
const GAP_Y = 30;

function linkOrigin(graph, link) {
  const record = graph.links.get?.(link) ?? graph.links[link];
  return record ? graph.getNodeById(record.origin_id) : null;
}

/** Longest-path depth of every node (cycles are cut where they are met). */
function depths(graph) {
  const depth = new Map();
  const visit = (node, seen) => {
    if (depth.has(node.id)) return depth.get(node.id);
    if (seen.has(node.id)) return 0;
    seen.add(node.id);
    let d = 0;
    for (const input of node.inputs ?? []) {
      const origin = input.link != null ? linkOrigin(graph, input.link) : null;
      if (origin) d = Math.max(d, visit(origin, seen) + 1);
    }
    depth.set(node.id, d);
    return d;
  };
  for (const node of graph._nodes) visit(node, new Set());
  return depth;
}

/** Columns by depth, each ordered so wires cross less. */
function columnsOf(graph) {
  const depth = depths(graph);
  const columns = [];
  for (const node of graph._nodes) {
    const needed = node.computeSize?.() ?? node.size;
    node.size = [Math.max(node.size[0], needed[0]), Math.max(node.size[1], needed[1])];
    (columns[depth.get(node.id)] ??= []).push(node);
  }
  const rank = new Map();
  const list = columns.filter(Boolean);
  for (const column of list) {
    const key = (node) => {
      const ranks = (node.inputs ?? []).map((i) => (i.link != null ? rank.get(linkOrigin(graph, i.link)?.id) : undefined)).filter((r) => r !== undefined);
      return ranks.length ? ranks.reduce((a, b) => a + b, 0) / ranks.length : 0;
    };
    column.sort((a, b) => key(a) - key(b) || a.id - b.id);
    column.forEach((node, i) => rank.set(node.id, rank.size + i));
  }
  return list;
}

/** Positions for ``columns``: a column taller than ``maxHeight`` continues in the next one,
 * and the columns wrap into a new band past ``maxWidth``. Returns [positions, width, height]. */
function pack(columns, maxWidth, maxHeight) {
  const titleH = LiteGraph.NODE_TITLE_HEIGHT;
  const positions = new Map();
  let [x, bandTop, bandBottom, right] = [0, 0, 0, 0];
  for (const column of columns) {
    const stacks = [[]];
    let height = 0;
    for (const node of column) {
      const h = node.size[1] + titleH + GAP_Y;
      if (height + h > maxHeight && stacks.at(-1).length) {
        stacks.push([]);
        height = 0;
      }
      stacks.at(-1).push(node);
      height += h;
    }
    for (const stack of stacks) {
      const width = Math.max(...stack.map((n) => n.size[0]));
      if (x + width > maxWidth && x > 0) {
        x = 0;
        bandTop = bandBottom + GAP_Y * 2;
      }
      let y = bandTop;
      for (const node of stack) {
        positions.set(node, [x, y + titleH]);
        y += node.size[1] + titleH + GAP_Y;
      }
      bandBottom = Math.max(bandBottom, y - GAP_Y);
      right = Math.max(right, x + width);
      x += width + GAP_X;
    }
  }
  return [positions, right, bandBottom];
}

/** Place every node of ``graph`` (sizes grow to what the node needs, never shrink) so the
 * whole graph fits a ``view`` (graph units, e.g. the canvas at the default zoom) as large as it can. */
export function tidyLayout(graph, { view = [1860, 900], origin = [40, 60] } = {}) {
  const columns = columnsOf(graph);
  let best = null;
  for (let maxHeight = 300; maxHeight <= 2400; maxHeight += 100) {
    for (let maxWidth = 800; maxWidth <= 4000; maxWidth += 200) {
      const [positions, w, h] = pack(columns, maxWidth, maxHeight);
      const scale = Math.min(view[0] / w, view[1] / h);
      if (!best || scale > best.scale + 1e-9) best = { scale, positions };
    }
  }
  for (const [node, [x, y]] of best?.positions ?? []) node.pos = [origin[0] + x, origin[1] + y];
}

/** Node boxes (title included) that overlap: [[idA, idB], ...]. */
export function overlaps(nodes) {
  const titleH = LiteGraph.NODE_TITLE_HEIGHT;
  const box = (n) => [n.pos[0], n.pos[1] - titleH, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const found = [];
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const [a, b] = [box(nodes[i]), box(nodes[j])];
      if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]) found.push([nodes[i].id, nodes[j].id]);
    }
  }
  return found;
}
