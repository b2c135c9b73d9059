/* The chat page's controller: conversations (store.js), the settings panel, sending a message and
 * streaming the reply (api.js) with a Stop button, the API key dialog, and the status panel
 * (status.js). It holds no state the browser does not also keep in localStorage. */

import { ApiError, explain, fetchSource, listModels, streamChat } from "./api.js";
import { drawMessage } from "./messages.js";
import { StatusPanel } from "./status.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const FIELDS = ["system", "temperature", "top_p", "max_tokens"];

let conversations = store.loadConversations();
let current = conversations[0]?.id ?? null;
let settings = store.loadSettings();
let controller = null;  // the AbortController of the reply streaming now

const conversation = () => conversations.find((c) => c.id === current);
const save = () => store.saveConversations(conversations);

// ---- conversations --------------------------------------------------------------------------
function drawList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    li.className = c.id === current ? "active" : "";
    li.dataset.id = c.id;
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.addEventListener("click", () => select(c.id));
    const del = document.createElement("button");
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => remove(c.id));
    li.append(open, del);
    ul.append(li);
  }
}

function drawMessages() {
  const box = $("messages");
  box.replaceChildren();
  for (const m of conversation()?.messages ?? []) drawMessage(box, m, openSource);
  box.scrollTop = box.scrollHeight;
}

function select(id) {
  if (controller) return;  // one reply at a time: switching mid-stream would orphan it
  current = id;
  drawList();
  drawMessages();
}

function startNew() {
  if (controller) return;
  const c = store.newConversation();
  conversations.unshift(c);
  save();
  select(c.id);
  $("prompt").focus();
}

function remove(id) {
  if (controller && id === current) return;
  conversations = conversations.filter((c) => c.id !== id);
  save();
  if (id === current) current = conversations[0]?.id ?? null;
  drawList();
  drawMessages();
}

// ---- settings, models, API key ----------------------------------------------------------------
function readSettings() {
  for (const f of FIELDS) settings[f] = $(f).value;
  settings.model = $("model").value;
  store.saveSettings(settings);
}

async function loadModels() {
  try {
    const ids = await listModels(store.loadKey());
    const select = $("model");
    select.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(settings.model)) select.value = settings.model;
    showNotice("");
    document.body.dataset.state = "ready";
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) askKey(explain(e));
    else {
      showNotice(explain(e));
      document.body.dataset.state = "ready";  // the page still works: the server may come back
    }
  }
}

function askKey(reason) {
  if (reason) $("key-reason").textContent = reason;
  $("key-input").value = store.loadKey();
  document.body.dataset.state = "needs-key";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function showNotice(text) {  // about the server, not the conversation: shown, never saved
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

async function openSource(source) {
  $("source-title").textContent = source.source;
  $("source-text").textContent = "…";
  $("source-dialog").showModal();
  try {
    $("source-text").textContent = await fetchSource(source.source, store.loadKey());
  } catch (e) {
    // not a file on the server (a URL, a pydoc page, a JSONL record): show what the model saw
    $("source-text").textContent = `${source.text}\n\n(${explain(e)})`;
  }
}

// ---- a message and its streamed reply ----------------------------------------------------------
function requestBody(c) {
  const history = c.messages.filter((m) => !m.error && m.content).map(({ role, content }) => ({ role, content }));
  const body = { messages: history, stream: true, stream_options: { include_usage: true } };
  if (settings.model) body.model = settings.model;
  if (settings.system?.trim()) body.messages.unshift({ role: "system", content: settings.system });
  const number = (f) => (settings[f] === "" || settings[f] == null ? undefined : Number(settings[f]));
  body.temperature = number("temperature");
  body.top_p = number("top_p");
  body.max_tokens = number("max_tokens");
  return body;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.state = busy ? "streaming" : "ready";
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  readSettings();
  const c = conversation() ?? (startNew(), conversation());
  if (!c.messages.length) c.title = text.slice(0, 48);
  c.messages.push({ role: "user", content: text });
  const body = requestBody(c);
  const reply = { role: "assistant", content: "", model: settings.model };
  c.messages.push(reply);
  save();
  drawList();
  $("prompt").value = "";
  const box = $("messages");
  drawMessage(box, c.messages[c.messages.length - 2], openSource);
  const update = drawMessage(box, reply, openSource);
  controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null, usage = null, chunks = 0;
  try {
    for await (const chunk of streamChat(body, store.loadKey(), controller.signal)) {
      if (chunk.sources) reply.sources = chunk.sources;
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        first ??= performance.now();
        chunks++;
        reply.content += choice.delta.content;
        if (chunks % 32 === 0) save();  // a reload mid-reply keeps most of it
      }
      if (choice?.finish_reason) reply.finish = choice.finish_reason;
      update(true);
      box.scrollTop = box.scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") reply.finish = "stopped";
    else {
      reply.error = explain(e);
      if (e instanceof ApiError && e.status === 401) askKey(reply.error);
    }
  } finally {
    const end = performance.now();
    // a stopped reply gets no usage chunk: each content chunk is about one token
    const tokens = usage?.completion_tokens ?? (chunks || null);
    reply.stats = {
      ttft: first && (first - start) / 1000, tokens, estimated: !usage,
      tps: first && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null,
    };
    controller = null;
    save();
    update(false);
    setBusy(false);
  }
}

// ---- wiring -----------------------------------------------------------------------------------
function init() {
  for (const f of FIELDS) if (settings[f] != null) $(f).value = settings[f];
  for (const f of [...FIELDS, "model"]) $(f).addEventListener("change", readSettings);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", startNew);
  $("export").addEventListener("click", () => store.exportConversations(conversations));
  $("change-key").addEventListener("click", () => askKey("The API key this browser sends (empty: none)."));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    store.saveKey($("key-input").value.trim());
    $("key-dialog").close();
    loadModels();
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("source-close").addEventListener("click", () => $("source-dialog").close());
  drawList();
  drawMessages();
  loadModels();
  new StatusPanel().start();
}

init();
