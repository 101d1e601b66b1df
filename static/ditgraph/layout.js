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

/** Place every node of ``graph``; sizes grow to what the node needs (never shrink). */
export function tidyLayout(graph, { maxWidth = 1900, origin = [40, 60] } = {}) {
  const depth = depths(graph);
  const columns = [];
  for (const node of graph._nodes) {
    const needed = node.computeSize?.() ?? node.size;
    node.size = [Math.max(node.size[0], needed[0]), Math.max(node.size[1], needed[1])];
    (columns[depth.get(node.id)] ??= []).push(node);
  }
  const rank = new Map();
  const titleH = LiteGraph.NODE_TITLE_HEIGHT;
  let x = origin[0];
  let bandTop = origin[1];
  let bandBottom = origin[1];
  for (const column of columns.filter(Boolean)) {
    // order by the mean rank of the inputs' origins: wires cross less
    const key = (node) => {
      const ranks = (node.inputs ?? []).map((i) => (i.link != null ? rank.get(linkOrigin(graph, i.link)?.id) : undefined)).filter((r) => r !== undefined);
      return ranks.length ? ranks.reduce((a, b) => a + b, 0) / ranks.length : 0;
    };
    column.sort((a, b) => key(a) - key(b) || a.id - b.id);
    const width = Math.max(...column.map((n) => n.size[0]));
    if (x + width > origin[0] + maxWidth && x > origin[0]) {
      x = origin[0];
      bandTop = bandBottom + GAP_Y * 2;
    }
    let y = bandTop;
    column.forEach((node, i) => {
      node.pos = [x, y + titleH];
      rank.set(node.id, i);
      y += node.size[1] + titleH + GAP_Y;
    });
    bandBottom = Math.max(bandBottom, y);
    x += width + GAP_X;
  }
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
