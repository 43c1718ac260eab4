// Chat page: a multi-turn conversation over POST /v1/chat/completions (stream: true), with image
// attachments (picker, drag-and-drop, paste), citations [n] linked to source cards, and the
// retrieval controls sent as the `retrieval` extension, and thumbs up/down (POST /v1/feedback) under
// each answer. Sentences the server's answer check (`verification` on the final chunk) found
// unsupported are marked, with the tokens no source contains. Untrusted text only ever goes through
// textContent / text nodes.

import {
  ApiError, apiFetch, authHeaders, el, errorFromResponse, fileToDataURL, formatBytes, formatScore,
  formatSource, formatTimings, friendlyMessage, getApiKey, loadImageInto, probeAuth, readSSE, setApiKey, loadKnowledgeBases,
} from "./api.js";

const SETTINGS_STORAGE = "vlmrag.chatSettings";

const $ = (id) => document.getElementById(id);
const ui = {
  conversation: $("conversation"),
  emptyState: $("empty-state"),
  composer: $("composer"),
  question: $("question"),
  imageInput: $("image-input"),
  attach: $("attach"),
  attachments: $("attachments"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  error: $("chat-error"),
  keyForm: $("api-key-form"),
  keyInput: $("api-key"),
  keyNote: $("api-key-note"),
  kb: $("opt-kb"),
  k: $("opt-k"),
  threshold: $("opt-threshold"),
  scorer: $("opt-scorer"),
  enabled: $("opt-enabled"),
  overlay: $("drop-overlay"),
  dialog: $("image-dialog"),
  dialogImg: $("image-dialog-img"),
  dialogTitle: $("image-dialog-title"),
};

const state = {
  history: [], // committed OpenAI messages: only turns that got an answer
  attachments: [], // {id, file, dataURL}
  controller: null, // AbortController of the streaming request
  turn: 0,
  nextAttachmentId: 1,
  savedModel: "", // the model id (knowledge base) picked last time
  savedScorer: "", // the scorer picked last time
};

// ---------------------------------------------------------------------------------------------
// Settings and API key

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    if (saved.k != null) ui.k.value = saved.k;
    if (saved.threshold != null) ui.threshold.value = saved.threshold;
    if (typeof saved.scorer === "string") state.savedScorer = saved.scorer;
    else if (typeof saved.reranker === "boolean") state.savedScorer = saved.reranker ? "vlm" : "clip"; // older pages
    if ([...ui.scorer.options].some((o) => o.value === state.savedScorer)) ui.scorer.value = state.savedScorer;
    if (typeof saved.enabled === "boolean") ui.enabled.checked = saved.enabled;
    state.savedModel = typeof saved.model === "string" ? saved.model : "";
  } catch {
    /* unreadable settings: keep the defaults */
  }
}

function saveSettings() {
  state.savedScorer = ui.scorer.value;
  try {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify({
      k: ui.k.value, threshold: ui.threshold.value, scorer: ui.scorer.value, enabled: ui.enabled.checked,
      model: ui.kb.value,
    }));
  } catch {
    /* storage disabled */
  }
}

/** The request's `retrieval` options from the controls (blank fields: server defaults). */
function retrievalOptions() {
  if (!ui.enabled.checked) return { enabled: false };
  const options = { enabled: true };
  if (ui.scorer.value) options.scorer = ui.scorer.value;
  const k = parseInt(ui.k.value, 10);
  if (Number.isFinite(k) && k >= 1) options.k = k;
  const threshold = parseFloat(ui.threshold.value);
  if (Number.isFinite(threshold) && threshold >= 0 && threshold <= 1) options.threshold = threshold;
  return options;
}

/** The scorer options from GET /v1/scorers (the server's registry), the saved one or the server's default
 * selected; the options in the page stay when the call fails. */
async function loadScorers(select, saved) {
  let body;
  try {
    body = await apiFetch("/v1/scorers");
  } catch {
    return select.value;
  }
  const scorers = (body && Array.isArray(body.scorers)) ? body.scorers.filter((s) => s && typeof s.name === "string") : [];
  if (scorers.length === 0) return select.value;
  // a scorer whose setting is empty (rerank without VLMRAG_RANKER_URL) is listed, marked, not offered
  select.replaceChildren(...scorers.map((s) => el("option", { value: s.name, title: s.description || "",
    disabled: s.available === false }, s.available === false ? `${s.name} (not configured)` : s.name)));
  const names = scorers.filter((s) => s.available !== false).map((s) => s.name);
  select.value = names.includes(saved) ? saved : names.includes(body.default) ? body.default : names[0];
  select.dataset.source = "server"; // built from the registry (the page's own options are the fallback)
  return select.value;
}

function showKeyForm(message) {
  ui.keyForm.hidden = false;
  ui.keyInput.value = getApiKey();
  if (message) ui.keyNote.textContent = message;
}

async function refreshAuth() {
  const auth = await probeAuth();
  if (auth.keyAccepted) {
    await loadKnowledgeBases(ui.kb, ui.kb.value || state.savedModel);
    await loadScorers(ui.scorer, state.savedScorer);
  }
  if (auth.authRequired) {
    showKeyForm(auth.keyAccepted
      ? "Key accepted. It is kept in this browser only."
      : auth.missing ? "This server needs an API key. It is kept in this browser only."
        : "The saved key was refused; paste a valid one.");
  }
}

// ---------------------------------------------------------------------------------------------
// Attachments

async function addFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  if (images.length === 0 && files.length > 0) {
    showError("Only images can be attached here; add documents on the Knowledge base page.");
    return;
  }
  for (const file of images) {
    try {
      const dataURL = await fileToDataURL(file);
      state.attachments.push({ id: state.nextAttachmentId++, file, dataURL });
    } catch (err) {
      showError(`Could not read ${file.name}: ${err.message}`);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  ui.attachments.replaceChildren(...state.attachments.map((item, i) => {
    const name = item.file.name || `pasted image ${i + 1}`;
    const remove = el("button", {
      type: "button", class: "remove", "aria-label": `Remove ${name}`, title: "Remove",
      onclick: () => {
        state.attachments = state.attachments.filter((a) => a.id !== item.id);
        renderAttachments();
        ui.question.focus();
      },
    }, "×");
    return el("li", { class: "attachment" },
      el("img", { src: item.dataURL, alt: `Attached image: ${name}` }),
      el("span", { class: "attachment-name" }, `${name} (${formatBytes(item.file.size)})`),
      remove);
  }));
}

// ---------------------------------------------------------------------------------------------
// Rendering the conversation

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

/** Whether the reader is at (or near) the end of the page, i.e. following the conversation. */
function nearBottom() {
  const root = document.scrollingElement || document.documentElement;
  return root.scrollHeight - (root.scrollTop + window.innerHeight) < 160;
}

/** Scroll to the end of the page (call only when following, so a reader scrolled up stays put). */
function scrollToBottom() {
  const root = document.scrollingElement || document.documentElement;
  root.scrollTop = root.scrollHeight;
}

/** Run a DOM update and keep following the conversation if the reader was following it. */
function following(update) {
  const follow = nearBottom();
  update();
  if (follow) scrollToBottom();
}

function renderUserTurn(text, attachments) {
  ui.emptyState.hidden = true;
  const bubble = el("article", { class: "message user", "aria-label": "You" },
    el("h2", { class: "visually-hidden" }, "You"));
  if (attachments.length) {
    bubble.append(el("div", { class: "message-images" },
      attachments.map((a) => el("img", { src: a.dataURL, alt: `Your image: ${a.file.name || "pasted image"}` }))));
  }
  if (text) bubble.append(el("p", { class: "message-text" }, text));
  ui.conversation.append(bubble);
  scrollToBottom();
}

/** Fill `container` with the answer text: [n] links to source cards, unsupported sentences marked. */
function renderAnswer(container, text, cardIds, verification) {
  const claims = ((verification && verification.claims) || []).filter((c) => c.supported === false);
  if (!claims.length) {
    container.replaceChildren(...citationNodes(text, cardIds));
    return;
  }
  // The server's offsets count code points; JavaScript strings count UTF-16 units.
  const units = [0];
  for (const ch of text) units.push(units[units.length - 1] + ch.length);
  const at = (offset) => units[Math.min(offset, units.length - 1)];
  const nodes = [];
  let last = 0;
  for (const claim of claims) {
    const start = at(claim.start);
    const end = at(claim.end);
    if (start < last || end <= start) continue;
    nodes.push(...citationNodes(text.slice(last, start), cardIds));
    const missing = claim.unsupported.join(", ");
    const span = el("span", { class: "claim unsupported", title: `Not found in the sources: ${missing}` });
    let inner = start;
    for (const token of (claim.checked || []).filter((t) => t.supported === false)) {
      const tokenStart = at(token.start);
      const tokenEnd = at(token.end);
      if (tokenStart < inner || tokenEnd > end) continue;
      span.append(...citationNodes(text.slice(inner, tokenStart), cardIds),
        el("mark", { class: "missing-token" }, text.slice(tokenStart, tokenEnd)));
      inner = tokenEnd;
    }
    span.append(...citationNodes(text.slice(inner, end), cardIds));
    nodes.push(span);
    last = end;
  }
  nodes.push(...citationNodes(text.slice(last), cardIds));
  container.replaceChildren(...nodes);
}

/** What no source of the answer contains, said under it (the marks alone are not read out). */
function verificationNote(verification) {
  const claims = ((verification && verification.claims) || []).filter((c) => c.supported === false);
  if (!claims.length) return null;
  const tokens = [...new Set(claims.flatMap((c) => c.unsupported))];
  const note = el("p", { class: "verify-note", role: "note" },
    el("strong", {}, claims.length === 1 ? "1 sentence is not supported by its sources" :
      `${claims.length} sentences are not supported by their sources`));
  if (tokens.length) {
    note.append(": no source contains ");
    tokens.forEach((token, i) => {
      if (i) note.append(", ");
      note.append(el("mark", { class: "missing-token" }, token));
    });
  }
  note.append(".");
  return note;
}

/** Text nodes and citation links of `text`: [n] / [n, m] that name a source card become links. */
function citationNodes(text, cardIds) {
  const nodes = [];
  const pattern = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    const numbers = match[1].split(",").map((s) => parseInt(s.trim(), 10));
    if (!numbers.some((n) => cardIds.has(n))) continue; // not a citation we can resolve: plain text
    nodes.push(document.createTextNode(text.slice(last, match.index)));
    const single = numbers.length === 1;
    if (!single) nodes.push(document.createTextNode("["));
    numbers.forEach((n, i) => {
      if (i) nodes.push(document.createTextNode(", "));
      const label = single ? `[${n}]` : String(n);
      if (cardIds.has(n)) {
        nodes.push(el("a", {
          class: "cite", href: `#${cardIds.get(n)}`, "aria-label": `source ${n}`,
          onclick: (event) => { event.preventDefault(); focusCard(cardIds.get(n)); },
        }, label));
      } else {
        nodes.push(document.createTextNode(label));
      }
    });
    if (!single) nodes.push(document.createTextNode("]"));
    last = match.index + match[0].length;
  }
  nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function focusCard(cardId) {
  const card = document.getElementById(cardId);
  if (!card) return;
  const dropped = card.closest(".dropped-list");
  if (dropped && dropped.hidden) dropped.hidden = false;
  card.scrollIntoView({ block: "nearest", behavior: "smooth" });
  card.focus({ preventScroll: true });
  card.classList.remove("flash");
  void card.offsetWidth; // restart the highlight animation
  card.classList.add("flash");
}

function openImage(url, title) {
  ui.dialogTitle.textContent = title;
  ui.dialogImg.alt = title;
  ui.dialogImg.removeAttribute("src");
  loadImageInto(ui.dialogImg, url);
  ui.dialog.showModal();
}

function sourceCard(source, cardId) {
  const label = source.index != null ? `[${source.index}]` : "candidate";
  const where = formatSource(source.source, source.page);
  let thumb;
  if (source.thumbnail_url || source.image_url) {
    const img = el("img", { alt: "", loading: "lazy", width: 72, height: 72 });
    loadImageInto(img, source.thumbnail_url || source.image_url);
    thumb = el("button", {
      type: "button", class: "thumb", "aria-label": `Enlarge image of ${label}: ${where}`,
      onclick: () => openImage(source.image_url || source.thumbnail_url, `${label} ${where}`),
    }, img);
  } else {
    thumb = el("div", { class: "thumb text-thumb", "aria-hidden": "true" }, "Aa");
  }
  const status = source.kept
    ? el("span", { class: "badge kept" }, "kept")
    : el("span", { class: "badge dropped" }, "dropped");
  const excerpt = (source.text || "").trim();
  return el("li", { class: `source-card ${source.kept ? "is-kept" : "is-dropped"}`, id: cardId, tabindex: "-1" },
    thumb,
    el("div", { class: "source-body" },
      el("p", { class: "source-head" },
        el("strong", { class: "source-index" }, label), " ",
        el("span", { class: "source-name" }, where), " ", status),
      excerpt ? el("p", { class: "source-text" }, excerpt.length > 280 ? `${excerpt.slice(0, 280)}…` : excerpt) : null,
      el("p", { class: "scores" },
        el("span", {}, `CLIP ${formatScore(source.clip_score)}`), " · ",
        el("span", {}, `relevancy ${formatScore(source.relevancy)}`)),
      !source.kept && source.reason ? el("p", { class: "reason" }, `Why dropped: ${source.reason}`) : null));
}

/** Source cards (kept first, dropped behind a toggle); returns the map [n] -> card id. */
function renderSources(section, sources, turn) {
  const cardIds = new Map();
  const kept = sources.filter((s) => s.kept).sort((a, b) => (a.index ?? 1e9) - (b.index ?? 1e9));
  const dropped = sources.filter((s) => !s.kept);
  const keptCards = kept.map((s, i) => {
    const cardId = `t${turn}-src-${s.index ?? `k${i}`}`;
    if (s.index != null) cardIds.set(s.index, cardId);
    return sourceCard(s, cardId);
  });
  const children = [el("h3", { class: "sources-title" },
    kept.length ? `Sources (${kept.length})` : "No snippet was relevant enough to cite")];
  if (keptCards.length) children.push(el("ol", { class: "source-list" }, keptCards));
  if (dropped.length) {
    const list = el("ol", { class: "source-list dropped-list", hidden: true, id: `t${turn}-dropped` },
      dropped.map((s, i) => sourceCard(s, `t${turn}-drop-${i}`)));
    const toggleId = `t${turn}-show-dropped`;
    const toggle = el("input", {
      type: "checkbox", id: toggleId, class: "show-dropped", "aria-controls": list.id,
      onchange: (event) => { list.hidden = !event.target.checked; },
    });
    children.push(el("div", { class: "field checkbox small" }, toggle,
      el("label", { for: toggleId }, `Show dropped candidates (${dropped.length})`)));
    children.push(list);
  }
  section.replaceChildren(...children);
  section.hidden = false;
  return cardIds;
}

function createAssistantTurn(turn) {
  const answer = el("div", { class: "answer", "aria-busy": "true" });
  const status = el("p", { class: "status" }, "Searching the knowledge base…");
  const error = el("p", { class: "turn-error", role: "alert", hidden: true });
  const sources = el("section", { class: "sources", hidden: true, "aria-label": "Sources" });
  const meta = el("p", { class: "timings" });
  const bubble = el("article", { class: "message assistant", "aria-label": "Answer", id: `t${turn}` },
    el("h2", { class: "visually-hidden" }, "Answer"), status, answer, error, sources, meta);
  ui.conversation.append(bubble);
  scrollToBottom();
  return { bubble, answer, status, error, sources, meta };
}

// ---------------------------------------------------------------------------------------------
// Sending

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.composer.setAttribute("aria-busy", busy ? "true" : "false");
}

async function send() {
  if (state.controller) return;
  const text = ui.question.value.trim();
  const attachments = state.attachments;
  if (!text && attachments.length === 0) {
    ui.question.focus();
    return;
  }
  showError("");
  saveSettings();
  const content = [];
  if (text) content.push({ type: "text", text });
  for (const a of attachments) content.push({ type: "image_url", image_url: { url: a.dataURL } });
  const userMessage = { role: "user", content };

  const turn = ++state.turn;
  renderUserTurn(text, attachments);
  const view = createAssistantTurn(turn);
  ui.question.value = "";
  state.attachments = [];
  renderAttachments();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answerText = "";
  let final = null;
  let completionId = null; // the answer's id, for rating it (POST /v1/feedback)
  let frame = 0;
  const paint = () => {
    frame = 0;
    following(() => renderAnswer(view.answer, answerText, new Map()));
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({
        model: ui.kb.value || undefined, // "vlmrag/<kb>" picks the knowledge base
        messages: [...state.history, userMessage],
        stream: true,
        stream_options: { include_usage: true },
        retrieval: retrievalOptions(),
      }),
      signal: controller.signal,
    });
    if (!resp.ok) throw await errorFromResponse(resp);
    for await (const chunk of readSSE(resp)) {
      if (chunk.id) completionId = chunk.id;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (!answerText) view.status.textContent = "Answering…";
        answerText += delta.content;
        // Repaint at most once per frame while tokens pour in.
        if (!frame) frame = requestAnimationFrame(paint);
      }
      if (chunk.sources || chunk.timings || chunk.degraded || chunk.usage) {
        final = { ...(final || {}), ...Object.fromEntries(Object.entries(chunk).filter(([, v]) => v != null)) };
      }
    }
    cancelAnimationFrame(frame); // the final render (with citation links) replaces any pending one
    finishTurn(view, answerText, final, turn);
    if (completionId && final) addFeedback(view, completionId, turn); // only a whole answer is logged
    state.history.push(userMessage, { role: "assistant", content: answerText });
  } catch (err) {
    cancelAnimationFrame(frame);
    failTurn(view, err, answerText, final, turn);
    if (!answerText && !ui.question.value) {
      // Nothing was answered: give the question and images back so a retry is one keypress.
      ui.question.value = text;
      state.attachments = attachments;
      renderAttachments();
    }
  } finally {
    state.controller = null;
    setBusy(false);
    view.answer.setAttribute("aria-busy", "false");
    ui.question.focus();
  }
}

/** Show a finished turn from the top of its answer down (as much of its sources as fits). */
function revealTurn(bubble) {
  const root = document.scrollingElement || document.documentElement;
  const header = document.querySelector(".topbar");
  const offset = (header ? header.offsetHeight : 0) + 12;
  const top = bubble.getBoundingClientRect().top + root.scrollTop - offset;
  root.scrollTop = Math.min(top, root.scrollHeight);
}

function finishTurn(view, answerText, final, turn) {
  const follow = nearBottom();
  view.status.hidden = true;
  const sources = (final && final.sources) || [];
  const cardIds = sources.length ? renderSources(view.sources, sources, turn) : new Map();
  const verification = final && final.verification;
  renderAnswer(view.answer, answerText || "(empty answer)", cardIds, verification);
  const note = verificationNote(verification);
  if (note) view.answer.after(note);
  const notes = [];
  const timings = formatTimings(final && final.timings);
  if (timings) notes.push(timings);
  if (final && final.usage && final.usage.total_tokens) notes.push(`${final.usage.total_tokens} tokens`);
  if (final && final.degraded && final.degraded.length) notes.push(`degraded: ${final.degraded.join(", ")}`);
  view.meta.textContent = notes.join(" · ");
  if (follow) revealTurn(view.bubble);
}

// ---------------------------------------------------------------------------------------------
// Feedback: thumbs up/down and an optional comment on each answer

const COMMENT_MAX = 2000; // the server's default VLMRAG_LIMIT_FEEDBACK_COMMENT_CHARS; it says so when lower

async function sendFeedback(completionId, rating, comment) {
  const body = { completion_id: completionId, rating };
  if (comment) body.comment = comment;
  return apiFetch("/v1/feedback", { method: "POST", json: body });
}

// Inline SVG (Feather's thumbs, MIT): an emoji needs a colour-emoji font, which a minimal Linux lacks.
const THUMB_PATHS = {
  up: ["M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3z",
    "M7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"],
  down: ["M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3z",
    "M17 2h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17"],
};

function thumbIcon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [attr, value] of Object.entries({
    viewBox: "0 0 24 24", width: "18", height: "18", fill: "none", stroke: "currentColor", "stroke-width": "2",
    "stroke-linecap": "round", "stroke-linejoin": "round", "aria-hidden": "true", focusable: "false", class: "icon",
  })) svg.setAttribute(attr, value);
  for (const d of THUMB_PATHS[name]) {
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

/** Thumbs under a finished answer; a rating is recorded at once, a comment can follow it. */
function addFeedback(view, completionId, turn) {
  const note = el("span", { class: "feedback-note", role: "status", id: `t${turn}-feedback-note` });
  const commentId = `t${turn}-feedback-comment`;
  const comment = el("textarea", {
    id: commentId, rows: 2, maxlength: String(COMMENT_MAX), placeholder: "What was wrong or missing? (optional)",
  });
  const commentForm = el("form", { class: "feedback-comment", hidden: true },
    el("label", { class: "visually-hidden", for: commentId }, "Comment on this answer"), comment,
    el("button", { type: "submit", class: "secondary small" }, "Send comment"));
  let rating = null;
  const buttons = {};
  const pick = async (chosen) => {
    for (const [name, button] of Object.entries(buttons)) button.setAttribute("aria-pressed", String(name === chosen));
    note.textContent = "Sending…";
    try {
      await sendFeedback(completionId, chosen, comment.value.trim());
      rating = chosen;
      view.bubble.dataset.rating = chosen;
      note.textContent = chosen === "up" ? "Thanks, recorded." : "Thanks, recorded. Say what was missing?";
      commentForm.hidden = false;
    } catch (err) {
      for (const [name, button] of Object.entries(buttons)) button.setAttribute("aria-pressed", String(name === rating));
      note.textContent = `Not recorded: ${friendlyMessage(err)}`;
    }
  };
  for (const [name, label] of [["up", "Good answer"], ["down", "Bad answer"]]) {
    buttons[name] = el("button", {
      type: "button", class: `thumb-button ${name}`, "aria-label": label, title: label, "aria-pressed": "false",
      "data-rating": name, onclick: () => pick(name),
    }, thumbIcon(name));
  }
  commentForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = comment.value.trim();
    if (!text || !rating) return;
    note.textContent = "Sending…";
    try {
      await sendFeedback(completionId, rating, text);
      note.textContent = "Comment recorded. Thank you.";
      commentForm.hidden = true;
    } catch (err) {
      note.textContent = `Comment not recorded: ${friendlyMessage(err)}`;
    }
  });
  const bar = el("div", { class: "feedback", role: "group", "aria-label": "Rate this answer" },
    el("span", { class: "feedback-label" }, "Was this helpful?"), buttons.up, buttons.down, note);
  view.meta.before(bar, commentForm);
}

function failTurn(view, err, answerText, final, turn) {
  if (answerText) finishTurn(view, answerText, final, turn);
  else view.status.hidden = true;
  const message = friendlyMessage(err);
  view.error.textContent = message;
  view.error.hidden = false;
  view.bubble.classList.add("failed");
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    showKeyForm(err.status === 401 ? "This server needs a valid API key (scope: chat)." : message);
    ui.keyInput.focus();
  }
  view.error.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------------------------------------
// Wiring

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.attach.addEventListener("click", () => ui.imageInput.click());
ui.imageInput.addEventListener("change", async () => {
  await addFiles(ui.imageInput.files);
  ui.imageInput.value = ""; // picking the same file again still fires change
  ui.question.focus();
});
ui.newChat.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  ui.conversation.replaceChildren(ui.emptyState);
  ui.emptyState.hidden = false;
  showError("");
  ui.question.focus();
});
for (const input of [ui.kb, ui.k, ui.threshold, ui.scorer, ui.enabled]) input.addEventListener("change", saveSettings);
ui.kb.addEventListener("change", () => ui.newChat.click()); // another KB: another conversation

ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  setApiKey(ui.keyInput.value.trim());
  ui.keyNote.textContent = "Checking the key…";
  const auth = await probeAuth();
  ui.keyNote.textContent = auth.keyAccepted ? "Key saved in this browser." : "The server refused this key.";
  if (auth.keyAccepted) await loadKnowledgeBases(ui.kb, state.savedModel);
});

// Paste an image anywhere on the page (text pastes into the box as usual).
document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData ? event.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) {
    event.preventDefault();
    addFiles(files);
  }
});

// Drag and drop anywhere on the page.
let dragDepth = 0;
const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
document.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  dragDepth += 1;
  ui.overlay.hidden = false;
});
document.addEventListener("dragover", (event) => {
  if (hasFiles(event)) event.preventDefault(); // allow the drop
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) ui.overlay.hidden = true;
});
document.addEventListener("drop", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  ui.overlay.hidden = true;
  addFiles(event.dataTransfer.files);
});

ui.dialog.addEventListener("click", (event) => {
  if (event.target === ui.dialog) ui.dialog.close(); // click on the backdrop closes
});

loadSettings();
refreshAuth();
