// The ragloom console: asks through the gateway's REST API (same origin), streams the answer from
// POST /v1/ask:stream, shows its sources with the supporting spans, and adds and deletes documents.
// Plain ES module, no dependencies, no build step.

const TOKEN_KEY = "ragloom.token";
const DOCUMENTS_KEY = "ragloom.documents";
const SEQUENCES_KEY = "ragloom.sequences";

const $ = (selector) => document.querySelector(selector);

function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

const stored = {
  get: (key, fallback) => {
    try { return JSON.parse(sessionStorage.getItem(key)) ?? fallback; } catch { return fallback; }
  },
  set: (key, value) => sessionStorage.setItem(key, JSON.stringify(value)),
};

// ---- calls -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }

  /** What to tell the user: the status in words, then the server's own message. */
  get explained() {
    switch (this.status) {
      case 401: return `The gateway refused the token (401): ${this.message}. Enter a valid access token above ` +
        "(`ragloom token --tenant NAME` makes one).";
      case 403: return `Not allowed (403): ${this.message}`;
      case 413: return "Too large for the gateway (413): files are limited to 16 MiB each.";
      case 429: return `Over this tenant's request quota (429); try again in ${this.retryAfter || "a few"} s.`;
      case 0: return `The gateway could not be reached: ${this.message}`;
      case null: return this.message;
      default: return `Failed (${this.status}): ${this.message}`;
    }
  }
}

async function errorOf(response) {
  const text = await response.text();
  let message = text.trim() || response.statusText;
  try { message = JSON.parse(text).message || message; } catch { /* jwt_authn answers in plain text */ }
  return new ApiError(response.status, message, response.headers.get("retry-after"));
}

async function call(method, path, body, signal) {
  const headers = { "content-type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, error.message);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** Splits a streamed JSON array (the transcoder's form of a server stream) into its objects as they arrive. */
export class JsonArrayReader {
  constructor() {
    this.text = "";
    this.pos = 0;
    this.depth = 0;
    this.start = -1;
    this.inString = false;
    this.escaped = false;
    this.closed = false;
  }

  push(chunk) {
    this.text += chunk;
    const objects = [];
    for (; this.pos < this.text.length; this.pos++) {
      const c = this.text[this.pos];
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === "\\") this.escaped = true;
        else if (c === "\"") this.inString = false;
      } else if (c === "\"") {
        this.inString = true;
      } else if (c === "{" || c === "[") {
        this.depth += 1;
        if (this.depth === 2) this.start = this.pos;
      } else if (c === "}" || c === "]") {
        this.depth -= 1;
        if (this.depth === 1) {
          objects.push(JSON.parse(this.text.slice(this.start, this.pos + 1)));
          this.start = -1;
        } else if (this.depth === 0) {
          this.closed = true;
        }
      }
    }
    if (this.start < 0) {
      this.text = "";
      this.pos = 0;
    } else if (this.start > 0) {
      this.text = this.text.slice(this.start);
      this.pos -= this.start;
      this.start = 0;
    }
    return objects;
  }
}

async function* streamEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const array = new JsonArrayReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    yield* array.push(value);
  }
  if (!array.closed) throw new ApiError(null, "The answer stream was cut off before it finished.");
}

// ---- token -------------------------------------------------------------------------------------

function showTokenState() {
  const has = Boolean(sessionStorage.getItem(TOKEN_KEY));
  $("#token-state").textContent = has ? "Token kept for this tab." : "No token: calls go without one.";
  $("#token-forget").hidden = !has;
}

function setupToken() {
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#token").value.trim().replace(/^Bearer\s+/i, "");
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("#token").value = "";
    showTokenState();
    $("#question").focus();
  });
  $("#token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    $("#token").focus();
  });
  showTokenState();
}

// ---- asking ------------------------------------------------------------------------------------

/** `text` split at Unicode code points (the API's span offsets), with `spans` wrapped in <mark>. */
function highlighted(text, spans, className) {
  const points = Array.from(text);
  const parts = [];
  let at = 0;
  for (const span of [...spans].sort((a, b) => a.start - b.start)) {
    const start = Math.max(at, span.start ?? 0);
    const end = Math.min(points.length, span.end ?? 0);
    if (end <= start) continue;
    parts.push(points.slice(at, start).join(""), element("mark", { class: className }, points.slice(start, end).join("")));
    at = end;
  }
  parts.push(points.slice(at).join(""));
  return parts;
}

function sourceCard(source) {
  const n = source.number;
  const best = (source.evidence || []).slice(0, 1);
  return element("li", { id: `source-${n}`, class: "source", tabIndex: -1, "aria-label": `Source ${n}: ${source.document_id}` },
    element("div", { class: "source-head" },
      element("span", { class: "num" }, `[${n}]`),
      element("span", { class: "doc" }, source.document_id || source.source),
      element("span", { class: "meta" }, `score ${Number(source.score).toFixed(3)} · shard ${source.shard_id}`),
      element("span", { class: "badge", hidden: true }, "cited")),
    source.source && source.source !== source.document_id ? element("div", { class: "origin" }, source.source) : "",
    element("p", { class: "passage" }, ...highlighted(source.text, best, "evidence")));
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** Scrolls a card's passage (its height is capped) so that its first highlight is in view. */
function revealMark(card) {
  const passage = card.querySelector(".passage");
  const mark = passage.querySelector("mark.support") || passage.querySelector("mark");
  if (mark) passage.scrollTop = Math.max(0, mark.offsetTop - 24);
}

function markSupport(sources, done) {
  const cited = new Set(done.citations || []);
  const support = new Map();
  for (const s of done.support || []) {
    if (!support.has(s.source)) support.set(s.source, []);
    support.get(s.source).push(s.span);
  }
  for (const source of sources) {
    const card = document.getElementById(`source-${source.number}`);
    if (!card) continue;
    card.classList.toggle("cited", cited.has(source.number));
    card.querySelector(".badge").hidden = !cited.has(source.number);
    const spans = support.get(source.number);
    if (spans) card.querySelector(".passage").replaceChildren(...highlighted(source.text, spans, "support"));
    revealMark(card);
  }
}

/** Answer text with its [n] markers as links to the source cards. */
function answerNodes(text, numbers) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const n = Number(match[1]);
    if (!numbers.has(n)) continue;
    nodes.push(text.slice(last, match.index));
    nodes.push(element("a", { href: `#source-${n}`, class: "cite", "aria-label": `source ${n}` }, `[${n}]`));
    last = match.index + match[0].length;
  }
  nodes.push(text.slice(last));
  return nodes;
}

function jumpToSource(event) {
  const link = event.target.closest("a.cite");
  if (!link) return;
  event.preventDefault();
  const card = document.getElementById(link.hash.slice(1));
  if (!card) return;
  for (const other of document.querySelectorAll(".source.selected")) other.classList.remove("selected");
  card.classList.add("selected");
  card.scrollIntoView({ block: "nearest", behavior: "smooth" });
  card.focus({ preventScroll: true });
}

function notice(kind, text) {
  $("#notices").append(element("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text));
}

const ms = (value) => `${Math.round(value || 0).toLocaleString("en")} ms`;

let asking = null; // the AbortController of the ask in flight

async function ask(question) {
  asking?.abort();
  const controller = new AbortController();
  asking = controller;
  const answer = $("#answer");
  const state = $("#answer-state");
  $("#result").hidden = false;
  $("#notices").replaceChildren();
  answer.replaceChildren();
  answer.className = "answer streaming";
  answer.setAttribute("aria-busy", "true");
  $("#sources").replaceChildren();
  $("#sources-heading").textContent = "Sources";
  $("#timings").textContent = "";
  state.textContent = "Retrieving…";
  $("#stop-button").hidden = false;

  const started = performance.now();
  let firstText = 0;
  let sources = [];
  let numbers = new Set();
  let held = ""; // the end of the text so far when it may be the start of a [n] marker
  let finished = false; // the stream's `done` arrived
  try {
    const body = { question, min_sequences: stored.get(SEQUENCES_KEY, {}) };
    const response = await call("POST", "/v1/ask:stream", body, controller.signal);
    for await (const event of streamEvents(response)) {
      if (event.sources) {
        sources = event.sources.sources || [];
        numbers = new Set(sources.map((s) => s.number));
        $("#sources").replaceChildren(...sources.map(sourceCard));
        for (const card of $("#sources").children) revealMark(card);
        const coverage = event.sources.coverage || {};
        if (coverage.partial) {
          const failed = (coverage.shards_failed || []).join(", ");
          const answered = (coverage.shards_answered || []).join(", ") || "none";
          notice("warning", `Partial coverage: shard ${failed} did not answer, so this answer may miss documents ` +
            `held there (answered: shards ${answered}).`);
        }
        for (const line of coverage.degraded || []) notice("warning", `Degraded: ${line}`);
        state.textContent = event.sources.cached ? "Replaying a cached answer…" : "Generating…";
      } else if (event.token !== undefined) {
        if (!firstText) firstText = performance.now();
        // Verified sentences arrive whole; raw tokens (verification off) may split a marker: "[", "2]".
        const text = held + event.token;
        const cut = text.search(/\[\d*$/);
        held = cut < 0 ? "" : text.slice(cut);
        answer.append(...answerNodes(cut < 0 ? text : text.slice(0, cut), numbers));
      } else if (event.done) {
        const done = event.done;
        finished = true;
        answer.append(held);
        held = "";
        markSupport(sources, done);
        for (const line of done.degraded || []) notice("warning", `Degraded: ${line}`);
        if (done.abstained) {
          answer.classList.add("abstained");
          notice("abstained", "Not found in your documents: none of the passages retrieved answers this question.");
          $("#sources-heading").textContent = "Closest passages (none answers the question)";
        } else if (done.extractive) {
          notice("info", "Quoted from the best evidence: no generated sentence could be verified.");
        }
        const t = done.timings || {};
        $("#timings").textContent = `first token ${ms(t.time_to_first_token_ms)} · total ${ms(t.total_ms)}` +
          ` (in this browser: ${ms((firstText || performance.now()) - started)} · ${ms(performance.now() - started)})`;
      } else if (event.error) {
        throw new ApiError(null, `The answer failed midway: ${event.error.message || `gRPC status ${event.error.code}`}`);
      }
    }
    if (!finished) throw new ApiError(null, "The answer stream ended without its last message.");
    state.textContent = answer.classList.contains("abstained") ? "Abstained." : "Done.";
  } catch (error) {
    answer.append(held);
    if (error.name === "AbortError") {
      state.textContent = "Stopped: the answer above is incomplete.";
    } else {
      notice("error", error instanceof ApiError ? error.explained : String(error));
      state.textContent = answer.childNodes.length ? "Failed: the answer above is incomplete; do not rely on it." : "Failed.";
      if (error.status === 401) $("#token").focus();
    }
    answer.classList.add("incomplete");
  } finally {
    answer.classList.remove("streaming");
    answer.setAttribute("aria-busy", "false");
    if (asking === controller) {
      asking = null;
      $("#stop-button").hidden = true;
    }
  }
}

function setupAsk() {
  const form = $("#ask-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("#question").value.trim();
    if (question) ask(question);
  });
  $("#question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  $("#stop-button").addEventListener("click", () => asking?.abort());
  $("#answer").addEventListener("click", jumpToSource);
}

// ---- documents ---------------------------------------------------------------------------------

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function remember(result, sequences) {
  const documents = stored.get(DOCUMENTS_KEY, {});
  documents[result.id] = { chunks: result.chunks, shard: result.shard_id };
  stored.set(DOCUMENTS_KEY, documents);
  const seen = stored.get(SEQUENCES_KEY, {});
  for (const [shard, sequence] of Object.entries(sequences || {})) {
    if (!seen[shard] || BigInt(sequence) > BigInt(seen[shard])) seen[shard] = String(sequence);
  }
  stored.set(SEQUENCES_KEY, seen);
}

async function upload(file) {
  const row = element("li", { class: "upload" }, element("span", { class: "doc" }, file.name), " ",
    element("span", { class: "state" }, "uploading…"));
  $("#uploads").prepend(row);
  const state = row.querySelector(".state");
  try {
    if (file.size > 12 * 1024 * 1024) throw new ApiError(413, "too large"); // base64 grows it by 4/3 past 16 MiB
    const content = await base64Of(file);
    const response = await call("POST", "/v1/documents", { documents: [{ source: file.name, content }] });
    const reply = await response.json();
    const result = reply.documents[0];
    remember(result, reply.sequences);
    const replaced = result.replaced_chunks ? `, replacing ${plural(result.replaced_chunks, "chunk")}` : "";
    state.textContent = `added: ${plural(result.chunks, "chunk")} on shard ${result.shard_id}${replaced}`;
    row.classList.add("ok");
  } catch (error) {
    state.textContent = error instanceof ApiError ? error.explained : String(error);
    row.classList.add("failed");
  }
  renderDocuments();
}

async function uploadAll(files) {
  for (const file of files) await upload(file);
}

async function deleteDocument(id) {
  const state = $("#delete-state");
  state.textContent = `Deleting ${id}…`;
  try {
    const response = await call("DELETE", `/v1/documents/${encodeURIComponent(id)}`);
    const reply = await response.json();
    const documents = stored.get(DOCUMENTS_KEY, {});
    delete documents[id];
    stored.set(DOCUMENTS_KEY, documents);
    const seen = stored.get(SEQUENCES_KEY, {});
    for (const [shard, sequence] of Object.entries(reply.sequences || {})) seen[shard] = String(sequence);
    stored.set(SEQUENCES_KEY, seen);
    const removed = Number(reply.removed_chunks || 0);
    state.textContent = removed ? `Deleted ${id}: ${plural(removed, "chunk")} removed.` : `${id} was not there: nothing removed.`;
  } catch (error) {
    state.textContent = error instanceof ApiError ? error.explained : String(error);
  }
  renderDocuments();
}

function renderDocuments() {
  const documents = Object.entries(stored.get(DOCUMENTS_KEY, {}));
  $("#doc-table").hidden = documents.length === 0;
  $("#no-documents").hidden = documents.length > 0;
  $("#doc-table tbody").replaceChildren(...documents.map(([id, d]) => element("tr", {},
    element("td", {}, id), element("td", {}, String(d.chunks)), element("td", {}, String(d.shard)),
    element("td", {}, element("button", { type: "button", "aria-label": `Delete ${id}`, onclick: () => deleteDocument(id) },
      "Delete")))));
}

function setupDocuments() {
  const drop = $("#drop");
  $("#files").addEventListener("change", (event) => {
    uploadAll([...event.target.files]).finally(() => { event.target.value = ""; });
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    uploadAll([...event.dataTransfer.files]);
  });
  $("#delete-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("#delete-id").value.trim();
    if (id) deleteDocument(id).then(() => { $("#delete-id").value = ""; });
  });
  renderDocuments();
}

setupToken();
setupAsk();
setupDocuments();
document.documentElement.dataset.ready = "true";
