"""``GET /``: the dashboard, one self-contained page (inline SVG drawn by inline JS, no CDN) that polls
``GET /api/state`` and shows tokens per request and the policy's paired savings, the monitor's EM-drop
bound against delta, tau and the fallback over time, requests per second, and the A/B verdict."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maml-stop serve</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px} .cards{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:8px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:120px}
.card b{display:block;font-size:18px} .grid{display:grid;grid-template-columns:repeat(2,minmax(380px,1fr));gap:10px}
.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px} .panel h2{font-size:13px;margin:2px 4px}
svg{width:100%;height:190px} .axis{stroke:#999;stroke-width:1} .lbl{font-size:10px;fill:#666}
</style></head><body>
<h1>maml-stop serve: live stopping that keeps itself tuned</h1>
<div class="cards" id="cards"></div>
<div class="grid">
<div class="panel"><h2>tokens per request (rolling mean) and policy savings on feedback runs</h2><svg id="tokens"></svg></div>
<div class="panel"><h2>monitor: EM-drop bound against delta (dashed)</h2><svg id="bound"></svg></div>
<div class="panel"><h2>tau (line) and fallback (shaded) over feedback steps</h2><svg id="tau"></svg></div>
<div class="panel"><h2>requests per second</h2><svg id="rps"></svg></div>
</div>
<script>
const COLORS = {A: "#1f77b4", B: "#d62728", savings: "#2ca02c", delta: "#888"};
function esc(s){return String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
function draw(id, series, opts){
  const svg = document.getElementById(id), W = 480, H = 190, L = 40, R = 8, T = 8, B = 20;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = series.flatMap(s => s.points);
  let out = `<line class="axis" x1="${L}" y1="${H-B}" x2="${W-R}" y2="${H-B}"/><line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H-B}"/>`;
  if (!pts.length){ svg.innerHTML = out + `<text class="lbl" x="${W/2}" y="${H/2}">no data yet</text>`; return; }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]).concat(opts.hlines || []);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) + 1e-9, y0 = Math.min(0, ...ys), y1 = Math.max(...ys, 1e-9);
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const band of (opts.bands || [])) out += `<rect x="${sx(band[0])}" y="${T}" width="${Math.max(1, sx(band[1]) - sx(band[0]))}" height="${H-T-B}" fill="#f4cccc"/>`;
  for (const h of (opts.hlines || [])) out += `<line x1="${L}" x2="${W-R}" y1="${sy(h)}" y2="${sy(h)}" stroke="${COLORS.delta}" stroke-dasharray="4 3"/>`;
  for (const s of series){
    if (!s.points.length) continue;
    out += `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${s.points.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ")}"/>`;
    out += `<text class="lbl" x="${W-R-70}" y="${T + 12 * (series.indexOf(s) + 1)}" fill="${s.color}">${esc(s.name)}</text>`;
  }
  out += `<text class="lbl" x="2" y="${T+8}">${y1.toPrecision(3)}</text><text class="lbl" x="2" y="${H-B}">${y0.toPrecision(3)}</text>`;
  out += `<text class="lbl" x="${L}" y="${H-4}">${esc(opts.xlabel || "")}</text>`;
  svg.innerHTML = out;
}
function rolling(values, k){ const out = []; let s = 0; values.forEach((v, i) => { s += v; if (i >= k) s -= values[i-k]; out.push(s / Math.min(i + 1, k)); }); return out; }
function bands(states){ const out = []; let start = null;
  states.forEach((s, i) => { if (s.fallback && start === null) start = i; if (!s.fallback && start !== null){ out.push([start, i]); start = null; } });
  if (start !== null) out.push([start, states.length - 1]); return out; }
async function refresh(){
  let st; try { st = await (await fetch("api/state")).json(); } catch (e) { return; }
  const arms = Object.keys(st.states.arms), dec = st.series.decisions, states = st.series.states;
  let cards = `<div class="card">requests<b>${st.totals.requests}</b></div><div class="card">feedback<b>${st.totals.feedback}</b></div>`;
  for (const a of arms){ const s = st.states.arms[a];
    cards += `<div class="card">arm ${esc(a)}: tau<b>${s.tau === null ? "never" : s.tau.toPrecision(3)}</b>${s.fallback ? "FALLBACK" : (s.idle ? "idle" : "stopping")}</div>`;
    if (s.policy_savings !== null) cards += `<div class="card">arm ${esc(a)}: policy savings<b>${(100 * s.policy_savings).toFixed(1)}%</b></div>`; }
  if (st.states.ab) cards += `<div class="card">A/B (${st.states.ab.pairs} pairs)<b>${esc(st.states.ab.verdict || "no verdict yet")}</b></div>`;
  document.getElementById("cards").innerHTML = cards;
  const series = [];
  for (const a of arms){ const d = dec.filter(r => r.arm === a);
    series.push({name: "tokens " + a, color: COLORS[a], points: rolling(d.map(r => r.total_tokens), 20).map((v, i) => [i, v])}); }
  draw("tokens", series, {xlabel: "requests"});
  const fb = dec.filter(r => r.full_cost !== null); let sf = 0, ss = 0;
  const sav = fb.map((r, i) => { sf += r.full_cost; ss += r.stop_cost; return [i, 1 - ss / sf]; });
  document.getElementById("tokens").insertAdjacentHTML("beforeend", sav.length ? `<text class="lbl" x="45" y="20" fill="${COLORS.savings}">policy savings now: ${(100 * sav[sav.length-1][1]).toFixed(1)}%</text>` : "");
  const by = a => states.filter(s => s.arm === a);
  draw("bound", arms.map(a => ({name: "bound " + a, color: COLORS[a], points: by(a).map((s, i) => [i, s.bound === null ? 0 : s.bound])})), {hlines: [st.states.delta], xlabel: "feedback steps"});
  draw("tau", arms.map(a => ({name: "tau " + a, color: COLORS[a], points: by(a).map((s, i) => [i, s.tau === null ? 1 : s.tau])})), {bands: bands(by(arms[0])), xlabel: "feedback steps"});
  const t = dec.map(r => r.finished); const rps = [];
  if (t.length){ const t0 = Math.floor(t[0]); const n = Math.floor(t[t.length-1]) - t0 + 1; const c = new Array(Math.min(n, 600)).fill(0);
    t.forEach(x => { const i = Math.floor(x) - t0 - Math.max(0, n - 600); if (i >= 0) c[i]++; }); c.forEach((v, i) => rps.push([i, v])); }
  draw("rps", [{name: "req/s", color: "#555", points: rps}], {xlabel: "seconds"});
  document.body.dataset.ready = "1";
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
