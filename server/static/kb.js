// Knowledge-base page: upload images, text files and PDFs with per-file progress and result,
// browse (GET /v1/snippets, cursor pagination) and search (POST /v1/search) snippets, delete one;
// list the answers rated down in the chat (GET /v1/feedback?rating=down) with the snippets they used.
// Untrusted text only ever goes through textContent / text nodes.

import {
  apiFetch, el, fileToDataURL, formatBytes, formatScore, formatSource, friendlyMessage, getApiKey,
  kbOfModel, loadImageInto, loadKnowledgeBases, probeAuth, setApiKey, uploadForm, withKb,
} from "./api.js";

const KB_STORAGE = "vlmrag.kbPage.model";

const PAGE_SIZE = 24;

const $ = (id) => document.getElementById(id);
const ui = {
  kb: $("kb-select"),
  keyForm: $("api-key-form"),
  keyInput: $("api-key"),
  keyNote: $("api-key-note"),
  dropzone: $("dropzone"),
  uploadInput: $("upload-input"),
  tags: $("upload-tags"),
  uploadList: $("upload-list"),
  searchForm: $("search-form"),
  searchText: $("search-text"),
  searchImage: $("search-image"),
  searchK: $("search-k"),
  browseAll: $("browse-all"),
  filterForm: $("filter-form"),
  filterSource: $("filter-source"),
  status: $("list-status"),
  error: $("list-error"),
  grid: $("snippet-grid"),
  pager: $("pager"),
  prev: $("prev-page"),
  next: $("next-page"),
  pageLabel: $("page-label"),
  dialog: $("image-dialog"),
  dialogImg: $("image-dialog-img"),
  dialogTitle: $("image-dialog-title"),
  downStatus: $("down-status"),
  downList: $("down-list"),
  downMore: $("down-more"),
};

const state = {
  cursors: [null], // offset cursor of each page visited; the last one is the current page
  nextCursor: null,
  mode: "browse", // or "search"
  queue: Promise.resolve(), // uploads run one after another so progress stays readable
  uploadSeq: 0,
  downCursor: null, // next_cursor of the answers rated down
};

// ---------------------------------------------------------------------------------------------
// Errors and the key

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function handleAuthError(err) {
  if (err && (err.status === 401 || err.status === 403)) {
    ui.keyNote.textContent = err.status === 401
      ? "This server needs an API key with the admin scope: paste it here."
      : "This key lacks the admin scope needed here.";
    ui.keyInput.focus();
  }
}

ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  setApiKey(ui.keyInput.value.trim());
  ui.keyNote.textContent = "Checking the key…";
  const auth = await probeAuth();
  ui.keyNote.textContent = auth.keyAccepted ? "Key saved in this browser." : "The server refused this key.";
  await pickKnowledgeBase();
  loadPage();
  loadDownRated(true);
});

/** The knowledge base the page works on ("" = the key's default one). */
function currentKb() {
  return kbOfModel(ui.kb.value);
}

async function pickKnowledgeBase() {
  let saved = "";
  try {
    saved = localStorage.getItem(KB_STORAGE) || "";
  } catch {
    /* storage disabled */
  }
  await loadKnowledgeBases(ui.kb, saved);
}

ui.kb.addEventListener("change", () => {
  try {
    localStorage.setItem(KB_STORAGE, ui.kb.value);
  } catch {
    /* storage disabled */
  }
  state.cursors = [null];
  loadPage();
  loadDownRated(true);
});

// ---------------------------------------------------------------------------------------------
// Uploads

function fileKind(file) {
  // Everything but images goes to the file-ingest endpoint, which says why it refuses a type.
  return file.type.startsWith("image/") ? "image" : "document";
}

function uploadRow(file) {
  const id = `upload-${++state.uploadSeq}`;
  const progress = el("progress", { max: "1", value: "0", id: `${id}-progress`, "aria-label": `Upload progress of ${file.name}` });
  const result = el("span", { class: "upload-result", id: `${id}-result` }, "waiting…");
  const row = el("li", { class: "upload-row", id, "data-filename": file.name },
    el("span", { class: "upload-name" }, file.name),
    el("span", { class: "upload-size" }, formatBytes(file.size)),
    progress, result);
  ui.uploadList.prepend(row);
  return { row, progress, result };
}

function setResult(view, outcome, text) {
  view.row.dataset.outcome = outcome;
  view.result.className = `upload-result ${outcome}`;
  view.result.textContent = text;
}

/** The request for one file: images are one snippet; PDFs and text files go through the readers. */
function buildForm(file, kind) {
  const form = new FormData();
  const tags = ui.tags.value.split(",").map((t) => t.trim()).filter(Boolean);
  for (const tag of tags) form.append("tags", tag);
  if (kind === "image") {
    form.append("image", file, file.name);
    form.append("source", file.name);
    return { path: withKb("/v1/snippets", currentKb()), form };
  }
  // The server splits a PDF into pages (image + text) and a text file into passages.
  form.append("files", file, file.name);
  return { path: withKb("/v1/ingest/files", currentKb()), form };
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** A one-line summary of an ingest response: one snippet, or a file report. */
function describeResult(body) {
  if (body && Array.isArray(body.files) && body.files.length) {
    const report = body.files[0];
    const ingested = report.ingested || 0;
    const existing = report.existing || 0;
    const failed = report.failed || 0;
    const why = (report.failures || []).map((f) => f.reason).filter(Boolean);
    const tooLarge = (report.failures || []).some((f) => f.status === 413);
    if (!ingested && !existing) {
      const reason = why[0] || "nothing to ingest";
      return { outcome: "skipped", text: tooLarge ? `skipped: Too large: ${reason}` : `skipped: ${reason}` };
    }
    if (!ingested) return { outcome: "present", text: `already present (${plural(existing, "snippet")})` };
    const extra = [existing ? `${existing} already present` : "", failed ? `${failed} skipped: ${why[0] || ""}` : ""];
    const note = extra.filter(Boolean).join("; ");
    return { outcome: "ingested", text: `ingested ${plural(ingested, "snippet")}${note ? ` (${note})` : ""}` };
  }
  if (body && body.created === false) return { outcome: "present", text: "already present" };
  return { outcome: "ingested", text: "ingested" };
}

async function uploadOne(file) {
  const view = uploadRow(file);
  const kind = fileKind(file);
  try {
    const built = buildForm(file, kind);
    view.result.textContent = "uploading…";
    const body = await uploadForm(built.path, built.form, (fraction) => {
      view.progress.value = fraction;
      if (fraction >= 1) view.result.textContent = "processing…";
    });
    const { outcome, text } = describeResult(body);
    setResult(view, outcome, text);
  } catch (err) {
    view.progress.value = 0;
    setResult(view, "skipped", `skipped: ${friendlyMessage(err)}`);
    handleAuthError(err);
  }
}

function enqueue(files) {
  const list = [...files];
  if (!list.length) return;
  state.queue = state.queue.then(async () => {
    for (const file of list) await uploadOne(file);
    if (state.mode === "browse") await loadPage();
  });
}

ui.uploadInput.addEventListener("change", () => {
  enqueue(ui.uploadInput.files);
  ui.uploadInput.value = "";
});
ui.dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  ui.dropzone.classList.add("over");
});
ui.dropzone.addEventListener("dragleave", () => ui.dropzone.classList.remove("over"));
ui.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.dropzone.classList.remove("over");
  enqueue(event.dataTransfer.files);
});
// A drop that misses the zone must not navigate away to the dropped file.
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => event.preventDefault());

// ---------------------------------------------------------------------------------------------
// Browse, search, delete

function openImage(url, title) {
  ui.dialogTitle.textContent = title;
  ui.dialogImg.alt = title;
  ui.dialogImg.removeAttribute("src");
  loadImageInto(ui.dialogImg, url);
  ui.dialog.showModal();
}

async function deleteSnippet(item, card) {
  const where = formatSource(item.source, item.page);
  if (!window.confirm(`Delete this snippet (${where})? This cannot be undone.`)) return;
  try {
    await apiFetch(withKb(`/v1/snippets/${encodeURIComponent(item.id)}`, currentKb()), { method: "DELETE" });
    card.remove();
    ui.status.textContent = `Deleted the snippet from ${where}.`;
  } catch (err) {
    showError(friendlyMessage(err));
    handleAuthError(err);
  }
}

function snippetCard(item) {
  const where = formatSource(item.source, item.page);
  let thumb;
  if (item.thumbnail_url || item.image_url) {
    const img = el("img", { alt: "", loading: "lazy", width: 120, height: 120 });
    loadImageInto(img, item.thumbnail_url || item.image_url);
    thumb = el("button", {
      type: "button", class: "thumb", "aria-label": `Enlarge image: ${where}`,
      onclick: () => openImage(item.image_url || item.thumbnail_url, where),
    }, img);
  } else {
    thumb = el("div", { class: "thumb text-thumb", "aria-hidden": "true" }, "Aa");
  }
  const text = (item.text || "").trim();
  const card = el("li", { class: "snippet-card", "data-id": item.id, "data-source": item.source || "" });
  const scores = item.clip_score != null
    ? el("p", { class: "scores" },
      `CLIP ${formatScore(item.clip_score)} · relevancy ${formatScore(item.relevancy)}`,
      item.kept != null ? ` · ${item.kept ? "kept" : "dropped"}` : "",
      !item.kept && item.reason ? ` (${item.reason})` : "")
    : null;
  card.append(
    thumb,
    el("div", { class: "snippet-body" },
      el("p", { class: "source-head" },
        el("span", { class: "badge kind" }, item.kind || "snippet"), " ",
        el("span", { class: "source-name" }, where)),
      text ? el("p", { class: "source-text" }, text.length > 200 ? `${text.slice(0, 200)}…` : text) : null,
      item.tags && item.tags.length ? el("p", { class: "tags" }, `tags: ${item.tags.join(", ")}`) : null,
      scores,
      el("button", {
        type: "button", class: "danger small", "aria-label": `Delete snippet ${where}`,
        onclick: () => deleteSnippet(item, card),
      }, "Delete")));
  return card;
}

function renderItems(items, emptyText) {
  ui.grid.replaceChildren(...items.map(snippetCard));
  if (!items.length) ui.grid.append(el("li", { class: "empty-state" }, emptyText));
}

async function loadPage() {
  state.mode = "browse";
  showError("");
  const cursor = state.cursors[state.cursors.length - 1];
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (cursor != null) params.set("offset", cursor);
  const source = ui.filterSource.value.trim();
  if (source) params.set("source", source);
  if (currentKb()) params.set("kb", currentKb());
  ui.status.textContent = "Loading…";
  try {
    const body = await apiFetch(`/v1/snippets?${params}`);
    const items = (body && body.items) || [];
    state.nextCursor = body && body.next_offset != null ? String(body.next_offset) : null;
    renderItems(items, source ? `No snippet from "${source}".` : "The knowledge base is empty: add files above.");
    ui.status.textContent = `${items.length} snippet${items.length === 1 ? "" : "s"} on this page.`;
    ui.pager.hidden = false;
    ui.prev.disabled = state.cursors.length <= 1;
    ui.next.disabled = state.nextCursor == null;
    ui.pageLabel.textContent = `Page ${state.cursors.length}`;
  } catch (err) {
    ui.status.textContent = "";
    showError(friendlyMessage(err));
    handleAuthError(err);
  }
}

async function search() {
  const text = ui.searchText.value.trim();
  const imageFile = ui.searchImage.files && ui.searchImage.files[0];
  if (!text && !imageFile) {
    ui.status.textContent = "Type something or pick an image to search.";
    ui.searchText.focus();
    return;
  }
  state.mode = "search";
  showError("");
  ui.status.textContent = "Searching…";
  const body = {};
  if (text) body.text = text;
  const k = parseInt(ui.searchK.value, 10);
  if (Number.isFinite(k) && k >= 1) {
    body.k = k;
    body.pool = k; // show k candidates, kept or not
  }
  try {
    if (imageFile) body.image = await fileToDataURL(imageFile);
    const result = await apiFetch(withKb("/v1/search", currentKb()), { method: "POST", json: body });
    const candidates = (result && result.candidates) || [];
    renderItems(candidates, "No snippet matched.");
    ui.status.textContent = `${candidates.length} result${candidates.length === 1 ? "" : "s"} for your search.`;
    ui.pager.hidden = true;
  } catch (err) {
    ui.status.textContent = "";
    showError(friendlyMessage(err));
    handleAuthError(err);
  }
}

ui.searchForm.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
ui.browseAll.addEventListener("click", () => {
  ui.searchText.value = "";
  ui.searchImage.value = "";
  ui.filterSource.value = "";
  state.cursors = [null];
  loadPage();
});
ui.filterForm.addEventListener("submit", (event) => {
  event.preventDefault();
  state.cursors = [null];
  loadPage();
});
ui.next.addEventListener("click", () => {
  if (state.nextCursor == null) return;
  state.cursors.push(state.nextCursor);
  loadPage();
});
ui.prev.addEventListener("click", () => {
  if (state.cursors.length > 1) state.cursors.pop();
  loadPage();
});
ui.dialog.addEventListener("click", (event) => {
  if (event.target === ui.dialog) ui.dialog.close();
});

// ---------------------------------------------------------------------------------------------
// Answers rated down (GET /v1/feedback?rating=down): what the knowledge base did not have

const DOWN_PAGE = 10;

function formatWhen(epochSeconds) {
  const when = new Date(epochSeconds * 1000);
  return Number.isNaN(when.getTime()) ? "" : when.toLocaleString();
}

function downRatedItem(item) {
  const answer = item.answer || {};
  const sources = answer.sources || [];
  const kept = sources.filter((s) => s.kept).sort((a, b) => (a.index ?? 1e9) - (b.index ?? 1e9));
  const meta = [answer.kb && `knowledge base ${answer.kb}`, formatWhen(item.rated_at),
    `${plural(sources.length - kept.length, "candidate")} dropped`].filter(Boolean).join(" · ");
  const excerpt = (answer.answer || "").trim();
  const children = [
    el("p", { class: "down-rated-question" }, answer.question || "(a question with images only)"),
    el("p", { class: "down-rated-meta" }, meta),
  ];
  if (answer.search_query && answer.search_query !== answer.question) {
    children.push(el("p", { class: "down-rated-query" }, `Searched for: ${answer.search_query}`));
  }
  if (item.comment) children.push(el("p", { class: "down-rated-comment" }, item.comment));
  if (excerpt) {
    children.push(el("p", { class: "down-rated-answer source-text" },
      `Answer: ${excerpt.length > 300 ? `${excerpt.slice(0, 300)}…` : excerpt}`));
  }
  if (kept.length) {
    const flagged = new Set(item.snippet_ids || []);
    children.push(el("ol", { class: "down-rated-sources", "aria-label": "Snippets the answer used" },
      kept.map((s) => el("li", { "data-id": s.id },
        el("span", { class: "source-name" }, formatSource(s.source, s.page)), " ",
        el("span", { class: "scores" }, `relevancy ${formatScore(s.relevancy)} · CLIP ${formatScore(s.clip_score)}`),
        flagged.has(s.id) ? el("span", { class: "badge dropped" }, "flagged") : null))));
  } else {
    children.push(el("p", { class: "reason" }, "No snippet was kept: the knowledge base had nothing relevant enough."));
  }
  return el("li", { class: "down-rated-item", "data-completion-id": item.completion_id }, ...children);
}

async function loadDownRated(reset = false) {
  if (reset) {
    state.downCursor = null;
    ui.downList.replaceChildren();
  }
  const params = new URLSearchParams({ rating: "down", limit: String(DOWN_PAGE) });
  if (state.downCursor) params.set("cursor", state.downCursor);
  if (currentKb()) params.set("kb", currentKb());
  ui.downStatus.textContent = "Loading…";
  try {
    const body = await apiFetch(`/v1/feedback?${params}`);
    const items = (body && body.items) || [];
    ui.downList.append(...items.map(downRatedItem));
    state.downCursor = body && body.next_cursor ? body.next_cursor : null;
    ui.downMore.hidden = !state.downCursor;
    const shown = ui.downList.children.length;
    ui.downStatus.textContent = shown ? `${plural(shown, "answer")} rated down, newest first.`
      : "No answer has been rated down.";
  } catch (err) {
    ui.downMore.hidden = true;
    ui.downStatus.textContent = err && (err.status === 401 || err.status === 403)
      ? "Seeing the rated answers needs an API key with the admin scope."
      : `Could not load the rated answers: ${friendlyMessage(err)}`;
  }
}

ui.downMore.addEventListener("click", () => loadDownRated(false));

ui.keyInput.value = getApiKey();
pickKnowledgeBase().finally(() => {
  loadPage();
  loadDownRated(true);
});
