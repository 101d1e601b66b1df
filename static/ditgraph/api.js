// HTTP + websocket client for the ditgraph server (/api/...). No other module calls fetch.

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

async function request(method, path, body, { raw = false, headers = {}, keepalive = false } = {}) {
  const init = { method, headers: { ...headers }, ...(keepalive ? { keepalive } : {}) };
  if (body instanceof FormData || body instanceof Blob) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (raw) return response;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (!response.ok) {
    const detail = data?.detail ?? data?.error ?? data?.message ?? response.statusText;
    const message = typeof detail === "string" ? detail : JSON.stringify(detail);
    throw new ApiError(message || `HTTP ${response.status}`, response.status, data);
  }
  return data;
}

const enc = encodeURIComponent;

export const api = {
  nodes: () => request("GET", "/api/nodes"),
  validate: (workflow) => request("POST", "/api/validate", { workflow }),
  explain: (workflow) => request("POST", "/api/explain", { workflow }),
  queue: (workflow, clientId, targets = null, options = null) =>
    request("POST", "/api/runs", { workflow, client_id: clientId, ...(targets ? { targets } : {}), ...(options ? { options } : {}) }),
  runs: () => request("GET", "/api/runs"),
  run: (id) => request("GET", `/api/runs/${enc(id)}`),
  cancel: (id) => request("DELETE", `/api/runs/${enc(id)}`),
  cancelAll: () => request("POST", "/api/runs/cancel-all"),
  outputUrl: (path) => `/api/outputs/${String(path).split("/").map(enc).join("/")}`,
  upload: (file) => {
    const form = new FormData();
    form.append("file", file, file.name);
    return request("POST", "/api/uploads", form);
  },
  workflows: () => request("GET", "/api/workflows"),
  getWorkflow: (name, source) =>
    request("GET", `/api/workflows/${String(name).split("/").map(enc).join("/")}${source ? `?source=${source}` : ""}`),
  putWorkflow: (name, workflow) => request("PUT", `/api/workflows/${String(name).split("/").map(enc).join("/")}`, workflow),
  deleteWorkflow: (name) => request("DELETE", `/api/workflows/${String(name).split("/").map(enc).join("/")}`),
  renameWorkflow: (name, newName) =>
    request("POST", `/api/workflows/${String(name).split("/").map(enc).join("/")}/rename`, { new_name: newName }),
  inputUrl: (name) => `/api/inputs/${String(name).split("/").map(enc).join("/")}`,
  drafts: (workspace) => request("GET", `/api/drafts/${enc(workspace)}`),
  // keepalive: the request outlives the page (autosave on reload/close; the browser caps it at 64 KB)
  putDraft: (workspace, tab, draft, keepalive = false) => request("PUT", `/api/drafts/${enc(workspace)}/${enc(tab)}`, draft, { keepalive }),
  deleteDraft: (workspace, tab) => request("DELETE", `/api/drafts/${enc(workspace)}/${enc(tab)}`),
  history: (params = {}) => request("GET", `/api/history?${new URLSearchParams(params)}`),
  deleteHistory: (id) => request("DELETE", `/api/history/${enc(id)}`),
  workflowFromPng: (file) => {
    const form = new FormData();
    form.append("file", file, file.name || "image.png");
    return request("POST", "/api/workflow-from-png", form);
  },
};

/** The events websocket of this tab; reconnects with backoff. */
export class EventStream {
  constructor(clientId, onEvent, onStatus) {
    this.clientId = clientId;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.closed = false;
    this.delay = 500;
    this.connect();
  }

  connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${proto}://${location.host}/api/events?client_id=${enc(this.clientId)}`);
    this.socket = socket;
    socket.onopen = () => {
      this.delay = 500;
      this.onStatus?.(true);
    };
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this.onEvent(event);
    };
    socket.onclose = () => {
      this.onStatus?.(false);
      if (this.closed) return;
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 8000);
    };
  }

  close() {
    this.closed = true;
    this.socket?.close();
  }
}

/** Workflow JSON embedded in a PNG's text chunks (tEXt/iTXt keyword "workflow"), or null. */
export async function workflowFromPngBytes(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (!signature.every((b, i) => bytes[i] === b)) return null;
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  let offset = 8;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const keyword = latin1.decode(data.subarray(0, zero));
      if (keyword === "workflow" || keyword === "ditgraph") {
        let text;
        if (type === "tEXt") {
          text = latin1.decode(data.subarray(zero + 1));
        } else {
          const compressed = data[zero + 1];
          let rest = data.subarray(zero + 3);
          rest = rest.subarray(rest.indexOf(0) + 1); // language tag
          rest = rest.subarray(rest.indexOf(0) + 1); // translated keyword
          if (compressed) {
            const stream = new Blob([rest]).stream().pipeThrough(new DecompressionStream("deflate"));
            text = await new Response(stream).text();
          } else {
            text = utf8.decode(rest);
          }
        }
        try {
          return JSON.parse(text);
        } catch {
          return null;
        }
      }
    }
    if (type === "IEND") break;
    offset += 12 + length;
  }
  return null;
}
