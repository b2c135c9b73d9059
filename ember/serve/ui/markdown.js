/* A small, safe Markdown renderer for model replies: fenced code blocks, headings, lists,
 * paragraphs, inline code, bold, italic and links. Everything is HTML-escaped first, and the only
 * tags in the output are the ones written here, so a reply can never inject markup or script;
 * links keep only http(s), mailto and same-site addresses. An unclosed fence (a reply still
 * streaming) renders as a code block up to the end. */

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);

// checked on the escaped text: escaping never turns an unsafe scheme into a safe one
const SAFE_URL = /^(https?:\/\/|mailto:|\/(?!\/)|#|\.{1,2}\/)/i;

function inline(text) {
  const held = [];  // code spans (and links) are held aside so no other rule reaches inside them
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = escapeHtml(text.replace(/\u0000/g, ""));
  s = s.replace(/`([^`\n]+)`/g, (_, code) => hold(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
    SAFE_URL.test(url) ? hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`) : label);
  s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*|__(?=\S)([^_]*?\S)__/g, (_, a, b) => `<strong>${a ?? b}</strong>`);
  s = s.replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?![*\w])|(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?![_\w])/g,
    (_, p1, a, p2, b) => `${p1 ?? p2}<em>${a ?? b}</em>`);
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => held[+i]).replace(/\n/g, "<br>");
}

/** Markdown text -> HTML string (safe to assign to innerHTML). */
export function render(markdown) {
  const lines = markdown.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [], list = null;
  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${inline(paragraph.join("\n"))}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    // an ordered list keeps the number it starts at (a reply may continue one after a code block)
    const start = list?.start > 1 ? ` start="${list.start}"` : "";
    if (list) out.push(`<${list.tag}${start}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
    if (fence) {
      flushParagraph(); flushList();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      const lang = fence[2] ? ` data-lang="${escapeHtml(fence[2])}"` : "";
      out.push(`<pre${lang}><code>${escapeHtml(body.join("\n"))}</code></pre>`);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
    if (heading) {
      flushParagraph(); flushList();
      const n = Math.min(heading[1].length + 2, 6);  // h1 in a reply would outshout the page
      out.push(`<h${n}>${inline(heading[2])}</h${n}>`);
    } else if (item) {
      flushParagraph();
      const tag = /\d/.test(item[1]) ? "ol" : "ul";
      if (list?.tag !== tag) { flushList(); list = { tag, items: [], start: parseInt(item[1], 10) }; }
      list.items.push(item[2]);
    } else if (!line.trim()) {
      flushParagraph(); flushList();
    } else if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim();  // an item's continuation line
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flushParagraph(); flushList();
  return out.join("");
}
