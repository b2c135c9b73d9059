/* What the page keeps in the browser (localStorage; nothing of it is stored on the server):
 * the conversations, the settings and the API key. Each is read once at load and written
 * whole after every change, so a reload always finds the last saved state. */

const CONVERSATIONS = "ember.conversations";
const SETTINGS = "ember.settings";
const API_KEY = "ember.apiKey";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;  // a hand-edited or foreign value must not break the page
  }
}

export const loadConversations = () => read(CONVERSATIONS, []).filter((c) => c && Array.isArray(c.messages));
export const saveConversations = (list) => localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
export const loadSettings = () => read(SETTINGS, {});
export const saveSettings = (settings) => localStorage.setItem(SETTINGS, JSON.stringify(settings));
export const loadKey = () => localStorage.getItem(API_KEY) || "";
export const saveKey = (key) => localStorage.setItem(API_KEY, key);

// crypto.randomUUID needs a secure context, which http://<LAN address> is not
const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

export function newConversation() {
  return { id: newId(), title: "New chat", created: new Date().toISOString(), messages: [] };
}

/** Download every conversation as one JSON file (a blob: URL, so nothing leaves the browser). */
export function exportConversations(list) {
  const blob = new Blob([JSON.stringify({ exported: new Date().toISOString(), conversations: list }, null, 2)],
    { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "ember-conversations.json";
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
