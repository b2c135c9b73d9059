/* How one message is drawn: the text (Markdown for replies), the figures under a reply (tokens/s,
 * time to first token), its RAG sources and its error. `drawMessage` returns an `update` function
 * that redraws the same element in place, which is what streaming calls for every chunk. */

import { escapeHtml, render } from "./markdown.js";

function stats(message) {
  const s = message.stats;
  if (!s) return "";
  const parts = [];
  if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft != null) parts.push(`TTFT ${s.ttft.toFixed(2)} s`);
  if (s.tokens != null) parts.push(`${s.estimated ? "≈" : ""}${s.tokens} tokens`);
  if (message.finish) parts.push(message.finish === "length" ? "cut at Max tokens" : message.finish);
  if (message.model) parts.push(message.model);
  return parts.join(" · ");
}

function sourceTitle(s) {
  const file = s.source.split(/[\\/]/).pop();
  return s.headings?.length ? `${file} — ${s.headings.join(" › ")}` : file;
}

function drawSources(list, sources, openSource) {
  list.replaceChildren();
  for (const s of sources) {
    const li = document.createElement("li");
    li.innerHTML = `<b>[${Number(s.n)}] ${escapeHtml(sourceTitle(s))}</b>` +
      `<span class="snippet">${escapeHtml(s.text.slice(0, 240))}${s.text.length > 240 ? "…" : ""}</span>`;
    const link = document.createElement("a");
    link.href = "#";
    link.className = "source-link";
    link.textContent = s.source;
    link.addEventListener("click", (e) => { e.preventDefault(); openSource(s); });
    li.append(link);
    list.append(li);
  }
}

/** Append a message's element to `parent`; returns update(streaming) to redraw it. */
export function drawMessage(parent, message, openSource) {
  const el = document.createElement("div");
  el.className = `msg ${message.role}`;
  el.innerHTML = '<div class="content"></div><ol class="sources" hidden></ol>' +
    '<div class="error" role="alert" hidden></div><div class="meta"></div>';
  const [content, sources, error, meta] = el.children;
  parent.append(el);
  let drawnSources = null;
  const update = (streaming = false) => {
    if (message.role === "assistant") {
      content.innerHTML = render(message.content) + (streaming ? '<span class="cursor"></span>' : "");
    } else {
      content.textContent = message.content;  // what the person typed is shown as typed
    }
    if (message.sources?.length && drawnSources !== message.sources) {
      drawSources(sources, message.sources, openSource);
      drawnSources = message.sources;
      sources.hidden = false;
    }
    error.hidden = !message.error;
    error.textContent = message.error ?? "";
    meta.textContent = streaming ? "" : stats(message);
    el.dataset.done = String(!streaming);
  };
  update();
  return update;
}
