/* The live status panel: reads the server's Prometheus /metrics once a second and shows running
 * and waiting requests, KV cache usage and generated tokens/s, each with a sparkline of the last
 * minute (a canvas, so the page needs no plotting library). */

const HISTORY = 60;

/** Prometheus text -> Map(metric name -> sum over its label sets). */
export function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)/);
    if (m) values.set(m[1], (values.get(m[1]) ?? 0) + Number(m[2]));
  }
  return values;
}

function sparkline(canvas, series, max) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  if (series.length < 2) return;
  const top = Math.max(max ?? Math.max(...series), 1e-9);
  const x = (i) => (w * (i + HISTORY - series.length)) / (HISTORY - 1);
  const y = (v) => h - 1 - ((h - 2) * Math.min(v, top)) / top;
  g.beginPath();
  series.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.strokeStyle = getComputedStyle(canvas).color;
  g.lineWidth = 1.5;
  g.stroke();
  g.lineTo(x(series.length - 1), h);
  g.lineTo(x(0), h);
  g.globalAlpha = 0.15;
  g.fillStyle = g.strokeStyle;
  g.fill();
  g.globalAlpha = 1;
}

export class StatusPanel {
  constructor(doc = document) {
    this.el = (id) => doc.getElementById(id);
    this.series = { running: [], waiting: [], kv: [], tps: [] };
    this.last = null;  // [time, generation_tokens_total] of the previous scrape
  }

  start(interval = 1000) {
    this.tick();
    setInterval(() => this.tick(), interval);
  }

  push(name, value) {
    const s = this.series[name];
    s.push(value);
    if (s.length > HISTORY) s.shift();
  }

  async tick() {
    let m;
    try {
      const r = await fetch("/metrics", { cache: "no-store" });
      if (!r.ok) throw new Error(r.statusText);
      m = parseMetrics(await r.text());
    } catch {
      this.el("status-state").textContent = "unreachable";
      document.body.dataset.server = "down";
      return;
    }
    this.el("status-state").textContent = "";
    document.body.dataset.server = "up";
    const now = performance.now(), generated = m.get("ember:generation_tokens_total") ?? 0;
    const tps = this.last ? Math.max(0, (generated - this.last[1]) / ((now - this.last[0]) / 1000)) : 0;
    this.last = [now, generated];
    const running = m.get("ember:num_requests_running") ?? 0, waiting = m.get("ember:num_requests_waiting") ?? 0;
    const kv = m.get("ember:kv_cache_usage_perc") ?? 0;
    this.push("running", running); this.push("waiting", waiting); this.push("kv", kv); this.push("tps", tps);
    this.el("stat-running").textContent = String(running);
    this.el("stat-waiting").textContent = String(waiting);
    this.el("stat-kv").textContent = `${(100 * kv).toFixed(1)}%`;
    this.el("stat-tps").textContent = `${tps.toFixed(1)} tok/s`;
    sparkline(this.el("plot-running"), this.series.running);
    sparkline(this.el("plot-waiting"), this.series.waiting);
    sparkline(this.el("plot-kv"), this.series.kv, 1);
    sparkline(this.el("plot-tps"), this.series.tps);
  }
}
