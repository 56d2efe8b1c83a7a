// Device page: hardware facts, resource telemetry, drift time series with the alert bands,
// deployment history with reasons. New telemetry and drift windows are drawn as they arrive.

import { h, mount, api, debounce, badge, card, facts, shortId, errorBox, isNum,
  fmtBytes, fmtPct, fmtAgo, fmtNum, fmtTime } from "./dom.js";
import { lineChart, chartWidth } from "./charts.js";
import { on } from "./live.js";
import { measuredAgreement, KIND_TEXT } from "./overview.js";

const MAX_POINTS = 500;

function deviceIdFromPath() {
  const parts = location.pathname.split("/").filter(Boolean);
  return decodeURIComponent(parts[parts.length - 1] || "");
}

function band(points, key) {
  return points.map((p) => {
    const b = (p.bands || {})[key];
    return Array.isArray(b) ? { x: p.t, lo: b[0], hi: b[1] } : null;
  }).filter(Boolean);
}

function driftCharts(points, width) {
  const pick = (key, check = key) => points.filter((p) => isNum(p[key]))
    .map((p) => ({ x: p.t, y: p[key], alert: (p.out_of_band || []).includes(check), label: `window ${p.window}` }));
  // a model without classes (regression, score, embedding) reports its output summary, not a confidence
  const classless = points.some((p) => isNum(p.output_mean));
  const alerts = points.filter((p) => p.alert).map((p) => p.t);
  const outOf = (key) => points.filter((p) => (p.out_of_band || []).includes(key)).length;
  const note = (key) => (outOf(key) ? ` · ${outOf(key)} window(s) out of band` : "");
  return [
    lineChart({ id: "drift-agreement", title: `Agreement with the base model${note("agreement")}`, xTime: true, width, alerts,
      series: [{ name: "measured agreement", points: pick("agreement") },
        { name: "predicted", color: "#8c959f", line: true, points: points.filter((p) => isNum(p.predicted_agreement)).map((p) => ({ x: p.t, y: p.predicted_agreement })) }],
      band: band(points, "agreement"), yFormat: (v) => fmtPct(v, 1),
      empty: "No drift window with shadowed inputs yet." }),
    classless
      ? lineChart({ id: "drift-output", title: `Output summary${note("output_psi")}`, xTime: true, width, alerts,
        series: [{ name: "mean output summary", color: "#2da44e", points: pick("output_mean", "output_psi") },
          { name: "spread", color: "#8c959f", line: true, points: pick("output_std", "output_psi") }],
        yFormat: (v) => fmtNum(v, 2), empty: "No drift window yet." })
      : lineChart({ id: "drift-confidence", title: `Mean confidence${note("confidence")}`, xTime: true, width, alerts,
        series: [{ name: "mean top-1 confidence", color: "#2da44e", points: pick("confidence") }],
        band: band(points, "confidence"), yFormat: (v) => fmtPct(v, 0), empty: "No drift window yet." }),
    lineChart({ id: "drift-shift", title: `Input shift${note("input_shift")}`, xTime: true, width, alerts,
      series: [{ name: "input shift (vs the calibration inputs)", color: "#d9730d", points: pick("input_shift") }],
      band: band(points, "input_shift"), yFormat: (v) => fmtNum(v, 2), empty: "No drift window yet." }),
  ];
}

function telemetryCharts(tel, width) {
  const pts = (key, f = (v) => v) => tel.filter((p) => isNum(p[key])).map((p) => ({ x: p.t, y: f(p[key]) }));
  return [
    lineChart({ id: "tel-cpu", title: "CPU load and latency", xTime: true, height: 180, width,
      series: [{ name: "CPU %", color: "#1f6feb", points: pts("cpu_percent") },
        { name: "p50 latency ms", color: "#8250df", points: pts("p50_ms") }],
      yFormat: (v) => fmtNum(v, v >= 10 ? 0 : 1), empty: "No telemetry yet." }),
    lineChart({ id: "tel-mem", title: "Available memory", xTime: true, height: 180, width,
      series: [{ name: "available memory", color: "#0a7d8c", points: pts("available_memory") }],
      yFormat: fmtBytes, empty: "No telemetry yet." }),
  ];
}

function hardwareFacts(d) {
  const hw = d.hardware || {};
  const b = hw.benchmark || {};
  return facts([
    ["Memory", `${fmtBytes(hw.total_memory)} total · ${fmtBytes(hw.available_memory)} available`],
    ["Storage free", fmtBytes(hw.free_storage)],
    ["CPU", `${hw.cpu_model || "unknown"} · ${hw.physical_cores ?? "?"} physical / ${hw.logical_cores ?? "?"} logical cores`],
    ["Runtime formats", Array.isArray(hw.formats) ? hw.formats.join(", ") : "–"],
    ["onnxruntime", hw.ort_version || "–"],
    isNum(b.fp32_gflops) ? ["Benchmark", `${fmtNum(b.fp32_gflops, 1)} GFLOP/s fp32`] : null,
    isNum(hw.memory_budget) ? ["Memory budget", fmtBytes(hw.memory_budget)] : null,
    isNum(hw.storage_budget) ? ["Storage budget", fmtBytes(hw.storage_budget)] : null,
    ["Agent", d.agent_version || "–"],
  ]);
}

const SHADOW = {
  fp32: "fp32 base",
  master: "master model (every bit plane)",
  none: "none: confidence, entropy and input checks; uploads scored on the server",
};

// `v`: the model version the server derived from the active bundle (null for a bundle it did not build)
function activeFacts(a, v) {
  if (!a) return h("p", { class: "muted" }, "No model active yet.");
  const p = a.plan || {};
  return facts([
    ["Model", v ? `${v.name} v${v.version}` : a.model_name || "–"],
    ["Plan", h("span", { class: "plan" }, a.plan_label || "–")],
    ["Bundle", shortId(a.bundle_id, 16)],
    ["Storage form", isNum(a.base_file_bytes) ? `${fmtBytes(a.storage_bytes)} of ${fmtBytes(a.base_file_bytes)} (${fmtPct(a.storage_bytes / a.base_file_bytes, 0)})` : fmtBytes(a.storage_bytes)],
    ["Agreement", `predicted ${fmtPct(a.predicted_agreement)} · self-test ${fmtPct(measuredAgreement(a))}`],
    isNum(p.p50_ms) ? ["Latency p50", `${fmtNum(p.p50_ms, 2)} ms`] : null,
    isNum(p.session_rss) ? ["Session memory", fmtBytes(p.session_rss)] : null,
    isNum(a.download_bytes) ? ["Downloaded", fmtBytes(a.download_bytes)] : null,
    isNum(a.state_dir_bytes) ? ["State dir", fmtBytes(a.state_dir_bytes)] : null,
    a.shadow ? ["Drift shadow", SHADOW[a.shadow] || a.shadow] : null,
  ]);
}

function lastDriftFacts(p) {
  if (!p) return h("p", { class: "muted" }, "No drift window reported yet.");
  return facts([
    ["Window", `#${p.window} · ${fmtTime(p.t)} (${fmtAgo(p.t)})`],
    ["State", p.alert ? badge("alert", "ALERT: drift holds") : (p.out_of_band || []).length ? badge("deploying", "out of band") : badge("online", "in band")],
    ["Out of band", (p.out_of_band || []).join(", ") || "none"],
    ["Agreement", `${fmtPct(p.agreement)} measured · ${fmtPct(p.predicted_agreement)} predicted`],
    isNum(p.output_mean) ? ["Output summary", `mean ${fmtNum(p.output_mean, 3)} · spread ${fmtNum(p.output_std, 3)}`]
      : ["Confidence", fmtPct(p.confidence)],
    ["Input shift", fmtNum(p.input_shift, 3)],
    isNum(p.accuracy) ? ["Accuracy (labelled)", fmtPct(p.accuracy)] : null,
    isNum(p.n_samples) ? ["Inputs", `${p.n_samples} (${p.n_shadowed ?? 0} also run on the base)`] : null,
  ]);
}

const ACTION_TEXT = { accept: "Accept as normal", acknowledge: "Acknowledge", reanalyse: "Re-analyse" };

// The device's drift alerts: kind, why, what the server decided, and the operator's actions.
function alertsTable(alerts, reload) {
  if (!alerts.length) return h("p", { class: "muted" }, "No drift alert on this device.");
  const act = async (a, action, btn) => {
    btn.disabled = true;
    try { await api(`/api/drift-alerts/${encodeURIComponent(a.alert_id)}/${action}`, { method: "POST" }); reload(); }
    catch (err) { btn.replaceWith(errorBox(err.message)); }
  };
  return h("table", { class: "grid-table compact", id: "drift-alerts" },
    h("thead", {}, h("tr", {}, ["When", "Kind", "Status", "Why", "Decision", "Actions"].map((c) => h("th", {}, c)))),
    h("tbody", {}, alerts.slice(0, 10).map((a) => h("tr", { "data-kind": a.kind },
      h("td", {}, fmtTime(a.created_at)),
      h("td", {}, badge("alert", KIND_TEXT[a.kind] || a.kind)),
      h("td", {}, a.status),
      h("td", {}, a.why),
      h("td", {}, a.decision || "–"),
      h("td", {}, (a.actions || []).map((x) => h("button", { class: "btn small", "data-action": x,
        onclick: (ev) => act(a, x, ev.currentTarget) }, ACTION_TEXT[x] || x)),
        (a.actions || []).length ? h("div", { class: "sub", title: "register a retrained model version" },
          `new version: ${a.new_version}`) : null)))));
}

// The field samples the device uploaded: what the model actually saw (image inputs drawn).
function samplesGallery(samples) {
  if (!samples.length) return h("p", { class: "muted" }, "No field sample uploaded by this device.");
  return h("div", { class: "gallery", id: "samples" }, samples.map((x) => h("figure", { "data-sample": x.sample_id },
    x.image ? h("img", { src: `/api/samples/${x.sample_id}/image.png`, alt: `sample ${x.sample_id}`, loading: "lazy" })
      : h("div", { class: "muted" }, `${x.dtype} ${JSON.stringify(x.shape)}`),
    h("figcaption", {}, `#${x.window ?? "–"} · ${x.reason}`))));
}

function historyTable(items) {
  if (!items.length) return h("p", { class: "muted" }, "No deployment to this device yet.");
  return h("table", { class: "grid-table compact", id: "history" },
    h("thead", {}, h("tr", {}, ["Time", "Deployment", "Bundle", "Phase", "Reason"].map((c) => h("th", {}, c)))),
    h("tbody", {}, items.map((e) => h("tr", {},
      h("td", {}, fmtTime(e.t)), h("td", {}, shortId(e.deployment_id, 12)), h("td", {}, shortId(e.bundle_id, 8)),
      h("td", {}, badge(e.phase === "active" ? "online" : e.phase === "failed" ? "failed" : "deploying", e.phase)),
      h("td", { class: e.reason ? "warn" : "muted" }, e.reason || "–")))));
}

/** Draw one device's page into `root` and follow its events. */
export async function render(root) {
  const id = deviceIdFromPath();
  let d = null;
  const mine = (data) => d && data && data.device_id === id;
  const reload = debounce(() => load().catch((err) => console.error(err)), 300);
  const slots = {};
  const slot = (name, cls) => (slots[name] = h("div", { id: name, class: cls || null }));

  on("drift", (p) => {
    if (!mine(p)) return;
    d.drift = d.drift.filter((q) => q.window !== p.window || q.t !== p.t).concat([p]).slice(-MAX_POINTS);
    d.last_drift = p;
    d.alert = p.alert;
    drawDrift();
    drawHead();
  });
  on("telemetry", (t) => {
    if (!mine(t)) return;
    d.telemetry = d.telemetry.concat([t]).slice(-MAX_POINTS);
    drawTelemetry();
  });
  on("device", (v) => {
    if (!mine(v)) return;
    // the event carries no model version (the server derives it per bundle): a new bundle reloads it
    const moved = (v.active || {}).bundle_id !== (d.active || {}).bundle_id;
    Object.assign(d, v);
    drawHead();
    if (moved) reload();
  });
  on("status", (v) => { if (mine(v)) reload(); });
  on("deployment", reload);
  on("drift_alert", (a) => { if (mine(a)) reload(); });
  window.addEventListener("resize", debounce(() => { if (d) { drawDrift(); drawTelemetry(); } }, 200));

  function drawHead() {
    mount(slots.head, h("div", { class: "page-head" },
      h("h1", {}, d.device_id), badge(d.state, d.state),
      d.drift_kind ? badge("alert", KIND_TEXT[d.drift_kind] || d.drift_kind) : null,
      h("span", { class: "muted" }, `group ${d.group || "default"} · last seen ${fmtAgo(d.last_seen)}`)));
    mount(slots.hw, hardwareFacts(d));
    mount(slots.active, activeFacts(d.active, d.model_version));
    mount(slots.last, lastDriftFacts(d.last_drift));
  }
  function drawDrift() {
    mount(slots.drift, driftCharts(d.drift, chartWidth(slots.drift, 3)));
    slots.drift.dataset.points = String(d.drift.length);
  }
  function drawTelemetry() { mount(slots.tel, telemetryCharts(d.telemetry, chartWidth(slots.tel, 2))); }

  async function load() {
    d = await api(`/api/devices/${encodeURIComponent(id)}`);
    d.drift = d.drift || [];
    d.telemetry = d.telemetry || [];
    drawHead();
    drawDrift();
    drawTelemetry();
    mount(slots.hist, historyTable(d.deployments || []));
    const alerts = await api(`/api/drift-alerts?device_id=${encodeURIComponent(id)}`).catch(() => []);
    mount(slots.alerts, alertsTable(alerts, reload));
    const samples = await api(`/api/devices/${encodeURIComponent(id)}/samples`).catch(() => []);
    mount(slots.samples, samplesGallery(samples));
  }

  mount(root,
    h("p", { class: "crumbs" }, h("a", { href: "/" }, "Fleet overview"), " / device"),
    slot("head"),
    h("div", { class: "columns three" },
      card("Hardware", slot("hw")), card("Active model", slot("active")), card("Last drift window", slot("last"))),
    card("Drift alerts", h("p", { class: "hint" }, "Fidelity drift (the compressed model stops agreeing with the base) is re-analysed with this device's field samples; new data (the base model sees inputs unlike its training data) waits for you: accept it as normal (the device rebases its drift reference on it), re-analyse anyway, or register a retrained model version."), slot("alerts")),
    card("Field samples", h("p", { class: "hint" }, "The newest inputs this device uploaded as evidence (disputed or drifting windows), window and reason below each: what the base model is seeing."), slot("samples")),
    card("Drift", h("p", { class: "hint" }, "Green areas are the normal bands the agent checks each window against; red points are out of band; red strips mark windows in which the agent raised a drift alert."), slot("drift", "chart-grid cols-3")),
    card("Resources", slot("tel", "chart-grid cols-2")),
    card("Deployment history", slot("hist")));
  try {
    await load();
  } catch (err) {
    mount(root, h("p", { class: "crumbs" }, h("a", { href: "/" }, "Fleet overview")), errorBox(err.message));
  }
}
