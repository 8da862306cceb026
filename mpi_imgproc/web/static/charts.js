// Small inline-SVG charts: bars with min–max error bars, and a per-rank task stream.
// Drawn here so that the page needs nothing from elsewhere and works offline.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d",
  "#dc2626"];

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function colourFor(key) {
  let h = 0;
  for (const ch of String(key)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// rows: [{label, value, lo, hi}]; horizontal bars so that long labels fit on a phone.
function barChart(title, rows, unit, opts) {
  opts = opts || {};
  const wrap = document.createElement("div");
  wrap.className = "chart";
  wrap.appendChild(Object.assign(document.createElement("p"),
    { className: "chart-title", textContent: title }));
  const W = 520, left = 130, right = 60, rowH = 26, top = 8;
  const H = top + rows.length * rowH + 28;
  const max = niceMax(Math.max(opts.line || 0, ...rows.map((r) => r.hi ?? r.value)));
  const x = (v) => left + (W - left - right) * (v / max);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    svg.appendChild(svgEl("text", { x: left - 6, y: y + 16, "text-anchor": "end",
      "font-size": 12 }, r.label));
    svg.appendChild(svgEl("rect", { x: left, y: y + 4, width: Math.max(0, x(r.value) - left),
      height: rowH - 10, fill: r.colour || colourFor(r.label), rx: 2 }));
    if (r.lo !== undefined && r.hi !== undefined) {
      const cy = y + rowH / 2 - 1;
      svg.appendChild(svgEl("line", { x1: x(r.lo), x2: x(r.hi), y1: cy, y2: cy,
        stroke: "#111", "stroke-width": 1.5 }));
      for (const v of [r.lo, r.hi]) svg.appendChild(svgEl("line", { x1: x(v), x2: x(v),
        y1: cy - 5, y2: cy + 5, stroke: "#111", "stroke-width": 1.5 }));
    }
    svg.appendChild(svgEl("text", { x: Math.max(x(r.hi ?? r.value), x(r.value)) + 5, y: y + 16,
      "font-size": 11, fill: "#333" }, fmt(r.value) + (unit ? " " + unit : "")));
  });
  if (opts.line) {
    svg.appendChild(svgEl("line", { x1: x(opts.line), x2: x(opts.line), y1: top,
      y2: H - 24, stroke: "#888", "stroke-dasharray": "4 3" }));
  }
  const axisY = H - 22;
  svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: axisY, y2: axisY, stroke: "#999" }));
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    svg.appendChild(svgEl("text", { x: x(v), y: axisY + 14, "font-size": 10,
      "text-anchor": "middle", fill: "#555" }, fmt(v)));
  }
  wrap.appendChild(svg);
  return wrap;
}

// lanes: [{label, bars: [{start, end, busy, key, text}]}], times in seconds.
function timeline(title, lanes, t0, t1, zero) {
  zero = zero === undefined ? t0 : zero;
  const wrap = document.createElement("div");
  wrap.className = "chart";
  if (title) wrap.appendChild(Object.assign(document.createElement("p"),
    { className: "chart-title", textContent: title }));
  const W = 720, left = 70, right = 12, laneH = 26, top = 6;
  const H = top + Math.max(1, lanes.length) * laneH + 26;
  const span = Math.max(t1 - t0, 1e-6);
  const x = (t) => left + (W - left - right) * ((t - t0) / span);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title || "timeline" });
  lanes.forEach((lane, i) => {
    const y = top + i * laneH;
    svg.appendChild(svgEl("text", { x: left - 6, y: y + 17, "text-anchor": "end",
      "font-size": 12 }, lane.label));
    svg.appendChild(svgEl("rect", { x: left, y: y + 3, width: W - left - right,
      height: laneH - 6, fill: "#f1f3f7" }));
    for (const bar of lane.bars) {
      const x0 = x(Math.max(bar.start, t0)), x1 = Math.max(x0 + 1.5, x(Math.min(bar.end, t1)));
      const colour = colourFor(bar.key);
      const g = svgEl("g", {});
      g.appendChild(svgEl("rect", { x: x0, y: y + 4, width: x1 - x0, height: laneH - 8,
        fill: colour, "fill-opacity": 0.3, stroke: colour }));
      g.appendChild(svgEl("rect", { x: x0, y: y + 4, width: (x1 - x0) * Math.min(1, bar.busy || 0),
        height: laneH - 8, fill: colour }));
      g.appendChild(svgEl("title", {}, bar.text || ""));
      svg.appendChild(g);
    }
  });
  const axisY = H - 20;
  for (let k = 0; k <= 4; k++) {
    const t = t0 + (span * k) / 4;
    svg.appendChild(svgEl("text", { x: x(t), y: axisY + 14, "font-size": 10,
      "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle", fill: "#555" },
      fmt(t - zero) + " s"));
  }
  wrap.appendChild(svg);
  return wrap;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}
