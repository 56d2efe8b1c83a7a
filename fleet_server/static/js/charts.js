// Hand-made SVG charts (no library, nothing from a CDN): line charts with alert bands and
// per-category range charts. Sizes are in viewBox units; the SVG scales to its container.

import { h, s, isNum, fmtNum } from "./dom.js";

export const COLORS = ["#1f6feb", "#d9730d", "#2da44e", "#8250df", "#cf222e", "#0a7d8c", "#6e7781"];

/** About `count` round tick values covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => raw <= st) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

/** Tick times (epoch s) on round clock steps: every 1, 5, 15 min, 1 h, ... about `count` of them. */
export function timeTicks(lo, hi, count = 5) {
  const raw = (hi - lo) / count;
  const step = TIME_STEPS.find((st) => st >= raw) || Math.ceil(raw / 86400) * 86400;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) out.push(v);
  return out;
}

/**
 * Lay `el` out as a grid of up to `cols` charts side by side (fewer when narrow) and return the
 * width each chart should draw at (viewBox units = CSS pixels, so text stays its real size).
 */
export function chartWidth(el, cols = 1, gap = 16) {
  const w = (el && el.clientWidth) || 640;
  const n = Math.max(1, Math.min(cols, Math.floor((w + gap) / (380 + gap))));
  if (el) el.style.gridTemplateColumns = `repeat(${n}, minmax(0, 1fr))`;
  return Math.max(300, Math.floor((w - gap * (n - 1)) / n));
}

function timeLabel(t, span) {
  const d = new Date(t * 1000);
  if (span > 2 * 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  return d.toLocaleTimeString([], span > 3 * 3600 ? { hour: "2-digit", minute: "2-digit" } :
    { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function extent(values, pad = 0) {
  const v = values.filter(isNum);
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (lo === hi) { const d = Math.abs(lo) * 0.05 || 0.5; lo -= d; hi += d; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

/**
 * A line chart.
 * opts: {title, series: [{name, color, points: [{x, y, alert, label}], line: true}],
 *        band: [{x, lo, hi}] (normal band, drawn green), xTime, xLabel, yLabel, yFormat(v),
 *        xFormat(v), yDomain: [lo, hi], hlines: [{y, label}], height, empty}
 * Returns a <figure> with the SVG and a legend.
 */
export function lineChart(opts) {
  const W = opts.width || 640, H = opts.height || 210, m = { l: 60, r: 16, t: 12, b: opts.xLabel ? 40 : 26 };
  const iw = W - m.l - m.r, ih = H - m.t - m.b;
  const series = (opts.series || []).map((sr, i) => ({ color: COLORS[i % COLORS.length], line: true, ...sr,
    points: (sr.points || []).filter((p) => isNum(p.x) && isNum(p.y)) }));
  const all = series.flatMap((sr) => sr.points);
  const band = (opts.band || []).filter((b) => isNum(b.x) && (isNum(b.lo) || isNum(b.hi)));
  const fig = h("figure", { class: "chart", "data-chart": opts.id || null });
  if (opts.title) fig.append(h("figcaption", {}, opts.title));
  if (!all.length) {
    fig.append(h("div", { class: "chart-empty" }, opts.empty || "No data yet."));
    return fig;
  }
  const [x0, x1] = extent(all.map((p) => p.x).concat(band.map((b) => b.x)));
  const yVals = all.map((p) => p.y).concat(band.flatMap((b) => [b.lo, b.hi])).concat((opts.hlines || []).map((l) => l.y));
  const [y0, y1] = opts.yDomain || extent(yVals, 0.08);
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * iw;
  const Y = (v) => m.t + ih - ((Math.min(Math.max(v, y0), y1) - y0) / (y1 - y0)) * ih;
  const yFmt = opts.yFormat || ((v) => fmtNum(v, 2));
  const xFmt = opts.xFormat || (opts.xTime ? (v) => timeLabel(v, x1 - x0) : (v) => fmtNum(v, 2));
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  svg.append(s("rect", { x: m.l, y: m.t, width: iw, height: ih, class: "plot-bg" }));

  // the normal band: a step area following each window's own [lo, hi]
  if (band.length) {
    const lo = (b) => (isNum(b.lo) ? b.lo : y0), hi = (b) => (isNum(b.hi) ? b.hi : y1);
    const pts = [...band].sort((a, b) => a.x - b.x);
    const halfStep = pts.length > 1 ? (pts[1].x - pts[0].x) / 2 : (x1 - x0) / 2;
    const top = pts.map((b, i) => {
      const xa = i === 0 ? Math.max(x0, b.x - halfStep) : (pts[i - 1].x + b.x) / 2;
      const xb = i === pts.length - 1 ? Math.min(x1, b.x + halfStep) : (b.x + pts[i + 1].x) / 2;
      return [[X(xa), Y(hi(b))], [X(xb), Y(hi(b))], [X(xa), Y(lo(b))], [X(xb), Y(lo(b))]];
    });
    const upper = top.flatMap((q) => [q[0], q[1]]);
    const lower = top.flatMap((q) => [q[2], q[3]]).reverse();
    svg.append(s("polygon", { class: "band", points: upper.concat(lower).map((p) => p.join(",")).join(" ") },
      s("title", {}, "normal band: outside it the window counts as out of band")));
  }

  // windows in alert: a faint red strip behind everything else
  const strips = opts.alerts || [];
  if (strips.length) {
    const xs = [...new Set(all.map((p) => p.x))].sort((a, b) => a - b);
    const half = xs.length > 1 ? Math.min(...xs.slice(1).map((x, i) => x - xs[i])) / 2 : (x1 - x0) / 20;
    for (const ax of strips) {
      const xa = X(Math.max(x0, ax - half)), xb = X(Math.min(x1, ax + half));
      svg.append(s("rect", { x: xa, y: m.t, width: Math.max(2, xb - xa), height: ih, class: "alert-strip" },
        s("title", {}, `alert window at ${xFmt(ax)}`)));
    }
  }
  for (const t of niceTicks(y0, y1, 4)) {
    svg.append(s("line", { x1: m.l, x2: m.l + iw, y1: Y(t), y2: Y(t), class: "grid" }));
    svg.append(s("text", { x: m.l - 6, y: Y(t) + 4, class: "tick", "text-anchor": "end" }, yFmt(t)));
  }
  const nx = Math.max(2, Math.round(iw / 110));
  const xt = opts.xTime ? timeTicks(x0, x1, nx) : niceTicks(x0, x1, nx);
  for (const t of xt) {
    const anchor = X(t) > m.l + iw - 30 ? "end" : X(t) < m.l + 30 ? "start" : "middle";
    svg.append(s("line", { x1: X(t), x2: X(t), y1: m.t + ih, y2: m.t + ih + 4, class: "axis" }));
    svg.append(s("text", { x: X(t), y: m.t + ih + 16, class: "tick", "text-anchor": anchor }, xFmt(t)));
  }
  svg.append(s("line", { x1: m.l, x2: m.l + iw, y1: m.t + ih, y2: m.t + ih, class: "axis" }));
  if (opts.xLabel) svg.append(s("text", { x: m.l + iw / 2, y: H - 4, class: "axis-label", "text-anchor": "middle" }, opts.xLabel));
  if (opts.yLabel) {
    svg.append(s("text", { x: 12, y: m.t + ih / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.t + ih / 2})` }, opts.yLabel));
  }
  for (const l of opts.hlines || []) {
    svg.append(s("line", { x1: m.l, x2: m.l + iw, y1: Y(l.y), y2: Y(l.y), class: "hline" }));
    if (l.label) svg.append(s("text", { x: m.l + iw - 4, y: Y(l.y) - 4, class: "hline-label", "text-anchor": "end" }, l.label));
  }

  for (const sr of series) {
    const pts = [...sr.points].sort((a, b) => a.x - b.x);
    if (sr.line && pts.length > 1) {
      svg.append(s("polyline", { class: "series", stroke: sr.color, points: pts.map((p) => `${X(p.x)},${Y(p.y)}`).join(" ") }));
    }
    const r = pts.length > 60 ? 1.8 : 3;
    for (const p of pts) {
      svg.append(s("circle", { cx: X(p.x), cy: Y(p.y), r: p.alert ? r + 1.5 : r, fill: p.alert ? "#cf222e" : sr.color,
        class: p.alert ? "pt alert" : "pt" }, s("title", {}, `${sr.name}: ${yFmt(p.y)} at ${xFmt(p.x)}${p.label ? ` (${p.label})` : ""}${p.alert ? " · out of band" : ""}`)));
    }
  }
  fig.append(svg);
  const legend = h("div", { class: "legend" }, series.map((sr) => h("span", {}, h("i", { style: `background:${sr.color}` }), sr.name)));
  if (band.length) legend.append(h("span", {}, h("i", { class: "band-key" }), "normal band"));
  if (all.some((p) => p.alert)) legend.append(h("span", {}, h("i", { style: "background:#cf222e" }), "out of band"));
  if (strips.length) legend.append(h("span", {}, h("i", { class: "alert-key" }), "alert window"));
  fig.append(legend);
  return fig;
}

/**
 * Per-category ranges on a log axis: a bar from lo to hi and a dot at mid for each row.
 * opts: {title, rows: [{label, lo, mid, hi, note}], yLabel, height}
 */
export function rangeChart(opts) {
  const rows = (opts.rows || []).filter((r) => [r.lo, r.mid, r.hi].every((v) => isNum(v) && v > 0));
  const fig = h("figure", { class: "chart", "data-chart": opts.id || null });
  if (opts.title) fig.append(h("figcaption", {}, opts.title));
  if (!rows.length) {
    fig.append(h("div", { class: "chart-empty" }, opts.empty || "No data yet."));
    return fig;
  }
  const W = opts.width || 640, H = opts.height || 240, m = { l: 60, r: 16, t: 12, b: 56 };
  const iw = W - m.l - m.r, ih = H - m.t - m.b;
  const logs = rows.flatMap((r) => [Math.log10(r.lo), Math.log10(r.hi)]);
  const lo = Math.floor(Math.min(...logs));
  const top = Math.max(Math.ceil(Math.max(...logs)), lo + 1);
  const Y = (v) => m.t + ih - ((Math.log10(v) - lo) / (top - lo)) * ih;
  const bw = iw / rows.length;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  svg.append(s("rect", { x: m.l, y: m.t, width: iw, height: ih, class: "plot-bg" }));
  for (let e = lo; e <= top; e++) {
    svg.append(s("line", { x1: m.l, x2: m.l + iw, y1: Y(10 ** e), y2: Y(10 ** e), class: "grid" }));
    svg.append(s("text", { x: m.l - 6, y: Y(10 ** e) + 4, class: "tick", "text-anchor": "end" }, `1e${e}`));
  }
  rows.forEach((r, i) => {
    const cx = m.l + bw * (i + 0.5), w = Math.min(26, bw * 0.5);
    const tip = `${r.label}: p10 ${fmtNum(r.lo, 3)} · median ${fmtNum(r.mid, 3)} · p90 ${fmtNum(r.hi, 3)}${r.note ? ` · ${r.note}` : ""}`;
    svg.append(s("g", { class: "range" },
      s("title", {}, tip),
      s("rect", { x: cx - w / 2, y: Y(r.hi), width: w, height: Math.max(2, Y(r.lo) - Y(r.hi)), class: "range-bar" }),
      s("line", { x1: cx - w / 2 - 3, x2: cx + w / 2 + 3, y1: Y(r.mid), y2: Y(r.mid), class: "range-mid" })));
    const label = r.label.length > 14 ? `${r.label.slice(0, 13)}…` : r.label;
    svg.append(s("text", { x: cx, y: m.t + ih + 14, class: "tick", "text-anchor": "end",
      transform: `rotate(-30 ${cx} ${m.t + ih + 14})` }, label));
  });
  svg.append(s("line", { x1: m.l, x2: m.l + iw, y1: m.t + ih, y2: m.t + ih, class: "axis" }));
  if (opts.yLabel) {
    svg.append(s("text", { x: 12, y: m.t + ih / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.t + ih / 2})` }, opts.yLabel));
  }
  fig.append(svg);
  fig.append(h("div", { class: "legend" }, h("span", {}, h("i", { class: "range-key" }), "p10 – p90 of the layer's weights"),
    h("span", {}, h("i", { class: "mid-key" }), "median")));
  return fig;
}
