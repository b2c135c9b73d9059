/* The server's own OpenAI-compatible API, as the page uses it: the model list, a streamed chat
 * completion (fetch + ReadableStream, parsed as server-sent events) and the sentence a person
 * reads when a request fails. */

export class ApiError extends Error {
  constructor(status, message, code = "", retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const auth = (key) => (key ? { Authorization: `Bearer ${key}` } : {});

async function failure(response) {
  let message = response.statusText, code = "";
  try {
    const body = await response.json();
    message = body.error?.message ?? message;
    code = body.error?.code ?? "";
  } catch { /* not JSON: keep the status text */ }
  return new ApiError(response.status, message, code, response.headers.get("Retry-After"));
}

/** Ids of the models (and adapters) the server serves, as /v1/models lists them. */
export async function listModels(key) {
  const r = await fetch("/v1/models", { headers: auth(key) });
  if (!r.ok) throw await failure(r);
  return (await r.json()).data.map((m) => m.id);
}

/** The text of an indexed RAG source (/v1/rag/source), for the sources under an answer. */
export async function fetchSource(path, key) {
  const r = await fetch(`/v1/rag/source?path=${encodeURIComponent(path)}`, { headers: auth(key) });
  if (!r.ok) throw await failure(r);
  return r.text();
}

/** Yield the chunks of a streamed chat completion; aborting `signal` closes the connection,
 * which makes the server abort the request and free its KV blocks. */
export async function* streamChat(body, key, signal) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...auth(key) },
  });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code ?? "");  // failed mid-stream
        yield chunk;
      }
    }
  }
}

/** One clear sentence for a failed request (the server's own message kept after it). */
export function explain(err) {
  if (!(err instanceof ApiError)) {
    return `Cannot reach the server (${err.message}): is \`ember serve\` still running?`;
  }
  if (err.status === 401) return "The server wants an API key: enter it in the dialog (Settings → API key…).";
  if (err.status === 429) {
    const wait = err.retryAfter ? ` in ${err.retryAfter} s` : " in a few seconds";
    return `The server is busy: every running slot and its queue are full. Try again${wait}. (${err.message})`;
  }
  if (err.code === "context_length_exceeded") {
    return "Too long for the model's context: start a new chat, shorten the message or lower Max tokens. " +
      `(${err.message})`;
  }
  return `The server answered ${err.status}: ${err.message}`;
}
