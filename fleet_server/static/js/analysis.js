// Model / analysis page: per-layer tolerances, calibration curves, the QBC rounds and the
// what-if panel (a device or typed budgets -> the plan and its predicted fidelity).

import { h, mount, api, debounce, badge, card, facts, shortId, errorBox, isNum,
  fmtBytes, fmtPct, fmtNum, fmtTime } from "./dom.js";
import { lineChart, rangeChart } from "./charts.js";
import { on } from "./live.js";

function analysisIdFromPath() {
  const parts = location.pathname.split("/").filter(Boolean);
  return decodeURIComponent(parts[parts.length - 1] || "");
}

function toleranceChart(m, width) {
  const rows = (m && m.tensors || []).map((t) => ({ label: t.name, lo: t.tau_p10, mid: t.tau_median, hi: t.tau_p90,
    note: `${t.weights} weights` }));
  return rangeChart({ id: "tolerance", title: "Per-layer tolerance τ̂ (how far a weight may move at scale 1)",
    rows, width, height: 220, yLabel: "tolerance (log)", empty: "Tolerances appear when the analysis is done." });
}

function curveCharts(curves, budget, width) {
  const c = curves || {};
  const pts = (curve, xf) => ((curve && curve.points) || []).map((p) => ({ x: xf(p), y: p.disagreement,
    label: `KL ${fmtNum(p.kl, 4)}${isNum(p.accuracy) ? `, accuracy ${fmtPct(p.accuracy)}` : ""}` }));
  const hl = isNum(budget) ? [{ y: budget, label: `budget ${fmtPct(budget, 1)}` }] : [];
  return [
    lineChart({ id: "curve-prune", title: "Pruning: sparsity vs disagreement with the base", xLabel: "sparsity", width,
      series: [{ name: "prune", points: pts(c.prune, (p) => p.sparsity) }], hlines: hl,
      xFormat: (v) => fmtPct(v, 0), yFormat: (v) => fmtPct(v, 1), empty: "No pruning curve yet." }),
    lineChart({ id: "curve-quantize", title: "Mixed precision: mean bits per weight vs disagreement", width,
      xLabel: "mean bits per weight (pruned weights count as 0)",
      series: [{ name: "quantize", color: "#d9730d", points: pts(c.quantize, (p) => p.fixed_bits) },
        { name: "prune + quantize", color: "#8250df", line: false, points: pts(c["prune+quantize"], (p) => p.fixed_bits * (1 - p.sparsity)) }],
      hlines: hl, xFormat: (v) => fmtNum(v, 1), yFormat: (v) => fmtPct(v, 1), empty: "No quantization curve yet." }),
  ];
}

function qbcSection(a) {
  const m = a.manifest;
  if (!m) return h("p", { class: "muted" }, a.status === "failed" ? "The analysis failed." : "QBC rounds appear when the analysis is done.");
  const t = m.timings || {};
  return [
    facts([
      ["QBC rounds", String((m.rounds || []).length)],
      ["Samples used", `${m.samples_used} of a pool of ${m.pool_size} (held out: ${m.heldout_size})`],
      ["Weights analysed", String(m.weights)],
      isNum(m.base_accuracy) ? ["Base accuracy", fmtPct(m.base_accuracy)] : null,
      ["Time", Object.entries(t).map(([k, v]) => `${k} ${fmtNum(v, 1)} s`).join(" · ")],
    ]),
    h("div", { class: "table-wrap" }, h("table", { class: "grid-table compact", id: "rounds" },
      h("thead", {}, h("tr", {}, ["Round", "Samples", "Scale", "Disagreement", "Score chosen / random", "s"]
        .map((c) => h("th", {}, c)))),
      h("tbody", {}, (m.rounds || []).map((r) => h("tr", {},
        h("td", { class: "num" }, String(r.round)), h("td", { class: "num" }, String(r.samples)),
        h("td", { class: "num" }, fmtNum(r.committee_scale, 3)), h("td", { class: "num" }, fmtPct(r.committee_disagreement_heldout)),
        h("td", { class: "num" }, `${fmtNum(r.selected_score_mean, 3)} / ${fmtNum(r.random_score_mean, 3)}`),
        h("td", { class: "num" }, fmtNum(r.seconds, 1))))))),
  ];
}

function sizeText(size, base) {
  if (!isNum(base) || !isNum(size) || size <= 0) return fmtBytes(size);
  const ratio = base / size;
  return `${fmtBytes(size)} of ${fmtBytes(base)} (${ratio < 1.05 ? "same as the base model" : `${ratio.toFixed(1)}× smaller`})`;
}

function planResult(res) {
  if (!res.feasible) {
    return h("div", { class: "whatif-result infeasible", id: "whatif-result" },
      h("h3", {}, "Not feasible"), h("p", {}, res.reason || "No plan meets these limits."));
  }
  const p = res.plan || {};  // a PlanSummary with predictions only: nothing is built for a what-if
  return h("div", { class: "whatif-result feasible", id: "whatif-result" },
    h("h3", {}, "Plan: ", h("span", { class: "plan" }, p.label || "–")),
    facts([
      ["Predicted agreement", fmtPct(isNum(p.predicted_disagreement) ? 1 - p.predicted_disagreement : null, 2)],
      ["Size", sizeText(p.predicted_storage_bytes, p.base_file_bytes)],
      ["Session memory", fmtBytes(p.predicted_memory_bytes)],
      ["Sparsity", fmtPct(p.sparsity, 0)],
      ["Bits per weight", fmtNum(p.entropy_bits, 1)],
      ["Runtime format", p.runtime || "–"],
    ]));
}

function whatIfPanel(id, devices, budget) {
  const num = (name, label, unit, step) => h("label", {}, label,
    h("span", { class: "input-unit" }, h("input", { type: "number", name, min: "0", step, placeholder: "no limit" }), unit));
  const select = h("select", { name: "device_id", id: "whatif-device" },
    h("option", { value: "" }, "— typed limits below —"),
    devices.map((d) => h("option", { value: d.device_id }, `${d.device_id} (${fmtBytes((d.hardware || {}).total_memory)} RAM)`)));
  const out = h("div", { id: "whatif-out" }, h("p", { class: "muted" }, "Pick a device or type limits, then ask."));
  const form = h("form", { class: "whatif", id: "whatif-form" },
    h("label", {}, "Device", select),
    num("memory_mb", "Memory limit", "MB", "any"), num("storage_kb", "Storage limit", "KB", "any"),
    num("latency_ms", "Latency limit", "ms", "any"),
    h("label", {}, "Fidelity budget", h("span", { class: "input-unit" },
      h("input", { type: "number", name: "budget_pct", min: "0.01", max: "99", step: "any", value: String(+(100 * (budget || 0.01)).toFixed(2)) }), "% disagreement")),
    h("label", {}, "Objective", h("select", { name: "objective" }, h("option", { value: "fidelity" }, "best fidelity"), h("option", { value: "size" }, "smallest size"))),
    h("button", { type: "submit", class: "btn" }, "Show plan"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const val = (k) => (f.get(k) === "" || f.get(k) === null ? null : Number(f.get(k)));
    const body = {
      device_id: f.get("device_id") || null,
      memory: val("memory_mb") !== null ? Math.round(val("memory_mb") * 1048576) : null,
      storage: val("storage_kb") !== null ? Math.round(val("storage_kb") * 1024) : null,
      latency_s: val("latency_ms") !== null ? val("latency_ms") / 1000 : null,
      budget: (val("budget_pct") ?? 1) / 100,
      objective: f.get("objective") || "fidelity",
    };
    mount(out, h("p", { class: "muted" }, "Solving…"));
    try { mount(out, planResult(await api(`/api/analyses/${encodeURIComponent(id)}/whatif`, { json: body }))); }
    catch (err) { mount(out, errorBox(err.message)); }
  });
  return [h("p", { class: "hint" }, "Nothing is built or deployed: the plan comes from the calibration curves, as a device would derive it."), form, out];
}

/** Draw one analysis's page into `root`; follows its progress live. */
export async function render(root) {
  const id = analysisIdFromPath();
  const reload = debounce(() => load().catch((err) => console.error(err)), 400);
  on("analysis", (a) => { if (a && a.analysis_id === id) reload(); });
  on("device", debounce(() => refreshDevices(), 2000));
  let devices = [];
  let whatifShown = false;
  const whatifSlot = h("div", { id: "whatif" });

  async function refreshDevices() {
    try { devices = await api("/api/devices"); } catch { devices = []; }
  }

  async function load() {
    const a = await api(`/api/analyses/${encodeURIComponent(id)}`);
    let model = null;
    try { model = await api(`/api/models/${encodeURIComponent(a.model_id)}`); } catch { model = null; }
    const p = a.progress || {};
    const pct = isNum(p.total) && p.total > 0 ? p.done / p.total : null;
    const budget = a.budget ?? (a.manifest && a.manifest.settings && a.manifest.settings.budget);
    const head = h("div", { class: "page-head" },
      h("h1", {}, model ? model.name : "Analysis"), badge(a.status, a.status),
      h("span", { class: "muted" }, a.analysis_id));
    const summary = facts([
      ["Model", model ? `${model.name} · ${model.weights} weights · ${fmtBytes(model.size_bytes)}` : a.model_id],
      ["Why", a.reason || "–"],
      ["Fidelity budget", fmtPct(budget, 2)],
      ["Progress", a.status === "running" || a.status === "queued"
        ? h("span", {}, h("progress", { max: "1", value: String(pct ?? 0) }), ` ${p.phase || a.status} ${pct !== null ? fmtPct(pct, 0) : ""}`)
        : a.status],
      ["Created", fmtTime(a.created_at)], ["Finished", fmtTime(a.finished_at)],
      ["Bundle", shortId(a.bundle_id, 16)],
      a.error ? ["Error", h("span", { class: "warn" }, a.error)] : null,
    ]);
    if (a.status === "done" && !whatifShown) {
      await refreshDevices();
      mount(whatifSlot, whatIfPanel(id, devices, budget));
      whatifShown = true;
    } else if (a.status !== "done") {
      mount(whatifSlot, h("p", { class: "muted" }, "The what-if panel opens when the analysis is done."));
    }
    const inner = Math.max(320, root.clientWidth - 38); // the width inside a card
    const cols = inner >= 780 ? 2 : 1;
    mount(root,
      h("p", { class: "crumbs" }, h("a", { href: "/" }, "Fleet overview"), " / analysis"),
      head,
      h("div", { class: "columns" }, card("Analysis", summary), card("Query-by-committee", qbcSection(a))),
      card("Tolerances", toleranceChart(a.manifest, inner)),
      card("Calibration curves", h("div", { class: "chart-grid", style: `grid-template-columns: repeat(${cols}, minmax(0, 1fr))` },
        curveCharts(a.curves, budget, Math.floor((inner - 16 * (cols - 1)) / cols)))),
      card("What if…", whatifSlot));
  }
  try { await load(); } catch (err) { mount(root, h("p", { class: "crumbs" }, h("a", { href: "/" }, "Fleet overview")), errorBox(err.message)); }
}
