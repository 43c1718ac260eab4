// Shared helpers for the vlmrag pages: API key storage, fetch with OpenAI-style error bodies,
// SSE parsing over fetch (EventSource cannot POST), XHR uploads with progress, small formatters.
// No innerHTML anywhere: every caller builds DOM nodes and sets textContent.

const KEY_STORAGE = "vlmrag.apiKey";

/** The API key kept in this browser ("" when none). */
export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (private mode, file://): the key just is not remembered
  }
}

/** Remember (or forget, with "") the API key in this browser. */
export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: nothing to do */
  }
}

/** Headers carrying the stored API key, merged over `extra`. */
export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** An API failure: HTTP status plus the fields of the OpenAI-style error body. */
export class ApiError extends Error {
  constructor(status, { message, type, code, param } = {}, retryAfter = null) {
    super(message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.type = type || "";
    this.code = code || "";
    this.param = param || "";
    this.retryAfter = retryAfter;
  }
}

function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value); // Retry-After may also be an HTTP date
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** Turn an error body (any shape, or none) into an ApiError. */
export function errorFromBody(status, bodyText, retryAfterHeader) {
  let detail = {};
  try {
    const parsed = JSON.parse(bodyText);
    if (parsed && typeof parsed.error === "object" && parsed.error) detail = parsed.error;
    else if (parsed && typeof parsed.detail === "string") detail = { message: parsed.detail };
    else if (parsed && typeof parsed.message === "string") detail = parsed;
  } catch {
    // Not JSON (a proxy's HTML page, an empty body): keep a short plain-text excerpt.
    const text = (bodyText || "").trim();
    if (text && text.length < 300 && !text.startsWith("<")) detail = { message: text };
  }
  return new ApiError(status, detail, parseRetryAfter(retryAfterHeader));
}

/** Read a non-OK fetch Response into an ApiError. */
export async function errorFromResponse(resp) {
  let text = "";
  try {
    text = await resp.text();
  } catch {
    /* body unreadable: status alone will do */
  }
  return errorFromBody(resp.status, text, resp.headers.get("Retry-After"));
}

/** A sentence a person can act on, for any error thrown by these helpers or by fetch. */
export function friendlyMessage(err) {
  if (!(err instanceof ApiError)) {
    if (err && err.name === "AbortError") return "Stopped.";
    return `Could not reach the server (${err && err.message ? err.message : err}). Check that vlmrag is running.`;
  }
  const detail = err.message && err.message !== `HTTP ${err.status}` ? err.message : "";
  const wait = err.retryAfter != null ? ` Try again in ${err.retryAfter} s.` : " Try again in a moment.";
  switch (err.status) {
    case 401:
      return `An API key is needed, or the one given was refused. Enter a valid key in the API key field.${detail ? ` (${detail})` : ""}`;
    case 403:
      return `This API key is not allowed to do that${detail ? `: ${detail}` : "."}`;
    case 413:
      return `Too large: ${detail || "the upload is over the server's size limit."} Use a smaller file or image.`;
    case 415:
      return `Unsupported file type${detail ? `: ${detail}` : "."}`;
    case 429:
      return `Slow down: too many requests.${wait}${detail ? ` (${detail})` : ""}`;
    case 503:
      return `The service is busy or unavailable right now.${wait}${detail ? ` (${detail})` : ""}`;
    default:
      return detail || `The request failed (HTTP ${err.status}).`;
  }
}

/**
 * fetch() a vlmrag endpoint with the API key; `json` is sent as a JSON body, `body` as is.
 * Resolves to the parsed JSON (or null for an empty body); throws ApiError when not OK.
 */
export async function apiFetch(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await errorFromResponse(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/**
 * Yield each JSON payload of a Server-Sent-Events response body until `data: [DONE]`.
 * An in-stream `{"error": {...}}` event is thrown as an ApiError (status 0 = mid-stream).
 */
export async function* readSSE(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // Events end at a blank line; accept \n\n and \r\n\r\n alike.
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer))) {
        const rawEvent = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = rawEvent
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // comments / keep-alives
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload && payload.error) {
          const status = Number(payload.error.status || payload.error.http_status || 0);
          throw new ApiError(status, payload.error);
        }
        yield payload;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * POST a FormData with XMLHttpRequest so upload progress can be shown (fetch has no upload
 * progress). `onProgress(fraction)` gets 0..1. Resolves to the parsed JSON; rejects with ApiError.
 */
export function uploadForm(path, form, onProgress = () => {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && event.total > 0) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        try {
          resolve(xhr.responseText ? JSON.parse(xhr.responseText) : null);
        } catch (err) {
          reject(new ApiError(xhr.status, { message: `unreadable response: ${err.message}` }));
        }
      } else {
        reject(errorFromBody(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After")));
      }
    });
    xhr.addEventListener("error", () => reject(new TypeError("network error")));
    xhr.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
    xhr.send(form);
  });
}

/** Probe whether the server wants an API key: {authRequired, keyAccepted}. */
export async function probeAuth() {
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders() });
    if (resp.status === 401 || resp.status === 403) {
      const withoutKey = getApiKey() ? false : true;
      return { authRequired: true, keyAccepted: false, missing: withoutKey };
    }
    if (!getApiKey()) return { authRequired: false, keyAccepted: true, missing: false };
    // A key was sent and accepted; ask once without it to learn whether auth is on at all.
    const bare = await fetch("/v1/models");
    return { authRequired: bare.status === 401 || bare.status === 403, keyAccepted: true, missing: false };
  } catch {
    return { authRequired: false, keyAccepted: true, missing: false, unreachable: true };
  }
}

/** Read a File as a data: URL (what the chat API takes for images). */
export function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.addEventListener("load", () => resolve(reader.result));
    reader.addEventListener("error", () => reject(reader.error));
    reader.readAsDataURL(file);
  });
}

const IMAGE_RETRIES = 3;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Point an <img> at an API image URL. Without a key a plain src works (and lazy-loads); with a
 * key the request must carry the Authorization header, so the bytes are fetched into a blob URL.
 * A page of thumbnails can outrun the per-key rate limit (429), so failed loads are retried a few
 * times with backoff (honouring Retry-After when it is visible).
 */
export async function loadImageInto(img, url) {
  if (!url) return;
  if (!getApiKey()) {
    let attempt = 0;
    const retry = () => {
      if (attempt >= IMAGE_RETRIES || !img.isConnected) {
        img.removeEventListener("error", retry);
        return;
      }
      attempt += 1;
      setTimeout(() => { img.src = `${url}${url.includes("?") ? "&" : "?"}retry=${attempt}`; }, 700 * 2 ** attempt);
    };
    img.addEventListener("error", retry);
    img.src = url;
    return;
  }
  for (let attempt = 0; attempt <= IMAGE_RETRIES; attempt += 1) {
    try {
      const resp = await fetch(url, { headers: authHeaders() });
      if (resp.status === 429 || resp.status === 503) {
        const wait = parseRetryAfter(resp.headers.get("Retry-After"));
        await sleep(Math.max(wait != null ? wait * 1000 : 0, 500 * 2 ** attempt));
        continue;
      }
      if (!resp.ok) throw await errorFromResponse(resp);
      const blobUrl = URL.createObjectURL(await resp.blob());
      img.addEventListener("load", () => URL.revokeObjectURL(blobUrl), { once: true });
      img.src = blobUrl;
      return;
    } catch {
      break;
    }
  }
  img.src = url; // last resort: the server may serve images without auth
}

/** Format stage timings for small print, e.g. "embed 12 ms · search 3 ms". */
export function formatTimings(timings) {
  if (!timings || typeof timings !== "object") return "";
  const parts = [];
  for (const [key, raw] of Object.entries(timings)) {
    const value = Number(raw);
    if (!Number.isFinite(value)) continue;
    let name = key;
    let ms = value;
    if (key.endsWith("_ms")) name = key.slice(0, -3);
    else if (key.endsWith("_s")) {
      name = key.slice(0, -2);
      ms = value * 1000;
    }
    const shown = ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
    parts.push(`${name.replace(/_/g, " ")} ${shown}`);
  }
  return parts.join(" · ");
}

/** Human-readable byte size. */
export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** A score for display (or "–" when absent). */
export function formatScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "–";
}

/** "file.pdf · page 3" from a source name and optional page. */
export function formatSource(source, page) {
  const name = source || "(no source)";
  return page != null ? `${name} · page ${page}` : name;
}

/** Create an element with attributes and children (strings become text nodes, never HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/**
 * Fill a <select> with the knowledge bases this key may use (GET /v1/models: the alias is the key's
 * default KB, "<alias>/<kb>" the others). Option values are model ids; the field stays hidden when
 * there is only one. Resolves to the selected model id.
 */
export async function loadKnowledgeBases(select, saved) {
  let ids = [];
  try {
    const body = await apiFetch("/v1/models");
    ids = ((body && body.data) || []).map((m) => m.id);
  } catch {
    ids = [];
  }
  const alias = ids[0] || "vlmrag";
  const options = (ids.length ? ids : [alias]).map((id) =>
    el("option", { value: id }, id === alias ? "default" : id.slice(alias.length + 1)));
  select.replaceChildren(...options);
  if (saved && ids.includes(saved)) select.value = saved;
  const field = select.closest(".field");
  if (field) field.hidden = ids.length < 2;
  return select.value;
}

/** The knowledge-base name of a model id ("vlmrag/pumps" → "pumps"; the bare alias → ""). */
export function kbOfModel(modelId) {
  const slash = (modelId || "").indexOf("/");
  return slash < 0 ? "" : modelId.slice(slash + 1);
}

/** `path` with `?kb=` (or `&kb=`) added when `kb` names one (the key's default KB otherwise). */
export function withKb(path, kb) {
  if (!kb) return path;
  return `${path}${path.includes("?") ? "&" : "?"}kb=${encodeURIComponent(kb)}`;
}
