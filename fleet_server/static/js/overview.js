// Fleet overview: counts by state, the devices (a page at a time, filtered) with their plan and
// drift, analyses, re-analyses (with why) and deployments. Refreshes on live events, no reload.

import { h, mount, api, debounce, badge, card, shortId, errorBox, isNum,
  fmtBytes, fmtPct, fmtAgo, fmtNum, fmtTime } from "./dom.js";
import { on } from "./live.js";
import { devicePages } from "./device_pages.js";

const STATES = ["online", "deploying", "alert", "failed", "offline"];
// quarantined (never enrolled) and revoked devices get a badge but no count box: they are not part of the fleet
const STATE_TEXT = { online: "Online", deploying: "Deploying", alert: "Drift alert", failed: "Failed", offline: "Offline",
                     quarantined: "Quarantined: not enrolled", revoked: "Revoked" };

/** Agreement measured by the device's self-test (the API derives it from the plan's measured disagreement). */
export function measuredAgreement(active) {
  return active && isNum(active.measured_agreement) ? active.measured_agreement : null;
}

function hardwareCell(hw) {
  hw = hw || {};
  const cores = isNum(hw.physical_cores) ? `${hw.physical_cores} core${hw.physical_cores === 1 ? "" : "s"}` : null;
  const main = [isNum(hw.total_memory) ? `${fmtBytes(hw.total_memory)} RAM` : null, cores].filter(Boolean).join(" · ");
  const formats = Array.isArray(hw.formats) ? hw.formats.join(", ") : "";
  return h("td", {}, h("div", {}, main || "–"),
    h("div", { class: "sub" }, [hw.cpu_model, formats].filter(Boolean).join(" · ")));
}

function planCells(d) {
  const a = d.active;
  if (!a) return [h("td", { class: "muted" }, "no model yet"), h("td", { class: "muted" }, "–"), h("td", { class: "muted" }, "–")];
  const size = isNum(a.storage_bytes) && isNum(a.base_file_bytes) && a.base_file_bytes > 0
    ? [h("div", {}, `${fmtBytes(a.storage_bytes)} of ${fmtBytes(a.base_file_bytes)}`),
      h("div", { class: "sub" }, `${fmtPct(a.storage_bytes / a.base_file_bytes, 0)} of base · ${(a.base_file_bytes / a.storage_bytes).toFixed(1)}× smaller`)]
    : [h("div", {}, fmtBytes(a.storage_bytes))];
  const measured = measuredAgreement(a);
  const pred = a.predicted_agreement;
  const gap = isNum(measured) && isNum(pred) ? measured - pred : null;
  return [
    h("td", {}, h("div", {}, versionText(d.model_version) || a.model_name || "model"), h("div", { class: "sub plan" }, a.plan_label || "plan not reported"),
      h("div", { class: "sub" }, "bundle ", shortId(a.bundle_id, 8))),
    h("td", {}, size),
    h("td", { class: "num" }, h("div", {}, `${fmtPct(pred)} → ${fmtPct(measured)}`),
      h("div", { class: gap !== null && gap < -0.01 ? "sub warn" : "sub" }, "predicted → self-test")),
  ];
}

// The version a device runs: the server derives it from the bundle the device reports active.
function versionText(v) {
  return v ? `${v.name} v${v.version}` : null;
}

// One row per (group, version) with its device count: which groups run which version, so a
// staged rollout or a rollback can be followed group by group.
function versionsTable(rows) {
  if (!rows.length) return h("p", { class: "muted" }, "No enrolled device yet.");
  return h("table", { class: "grid-table compact", id: "group-versions" },
    h("thead", {}, h("tr", {}, ["Group", "Model version", "Devices"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", { "data-group": r.group, "data-version": r.version ?? "" },
      h("td", {}, r.group),
      h("td", { class: r.version ? "" : "muted" }, versionText(r.version ? r : null) || "no known version"),
      h("td", { class: "num" }, String(r.devices))))));
}

function driftCell(p) {
  if (!p) return h("td", { class: "muted" }, "no report yet");
  const parts = [`agreement ${fmtPct(p.agreement)}`, `shift ${fmtNum(p.input_shift, 2)}`];
  return h("td", {}, h("div", {}, `window ${p.window ?? "–"} · ${fmtAgo(p.t)}`),
    h("div", { class: p.alert ? "sub warn" : "sub" }, parts.join(" · ")));
}

function deviceRow(d) {
  return h("tr", { "data-device": d.device_id, class: `row-${d.state}` },
    h("td", {}, h("a", { href: `/devices/${encodeURIComponent(d.device_id)}`, class: "dev" }, d.device_id),
      h("div", { class: "sub" }, `group ${d.group || "default"} · seen ${fmtAgo(d.last_seen)}`)),
    h("td", {}, badge(d.state, STATE_TEXT[d.state] || d.state)),
    hardwareCell(d.hardware),
    ...planCells(d),
    driftCell(d.last_drift),
    h("td", {}, d.alert || d.drift_kind ? badge("alert", KIND_TEXT[d.drift_kind] || "ALERT") : h("span", { class: "ok" }, "ok")));
}

// What a drift alert means (fleet_server.drift_classify): the kind decides what happens next.
export const KIND_TEXT = { fidelity: "fidelity drift", data: "new data", unclassified: "classifying" };

// Counted by the server (the listing's facets); a click filters the device table by that kind.
function kindCounts(facets, pick) {
  const n = { fidelity: 0, data: 0, unclassified: 0, ...facets.alert };
  return h("div", { class: "counts kinds", id: "alert-kinds" },
    Object.entries(n).map(([k, v]) => h("div", { class: `count pick c-${v ? "alert" : "online"}`, "data-kind": k,
      onclick: () => pick("alert", k) }, h("b", {}, v.toLocaleString("en-US")), h("span", {}, `alert: ${KIND_TEXT[k]}`))));
}

// Alerts that started no re-analysis, with the reason (data drift, cooldown, daily cap, escalation).
function decisionsTable(alerts) {
  const shown = alerts.filter((a) => a.status !== "reanalysing");
  if (!shown.length) return h("p", { class: "muted" }, "No open drift alert without a re-analysis.");
  return h("table", { class: "grid-table compact", id: "drift-decisions" },
    h("thead", {}, h("tr", {}, ["Device", "Kind", "Status", "Why no re-analysis"].map((c) => h("th", {}, c)))),
    h("tbody", {}, shown.slice(0, 12).map((a) => h("tr", {},
      h("td", {}, h("a", { href: `/devices/${encodeURIComponent(a.device_id)}` }, a.device_id)),
      h("td", {}, KIND_TEXT[a.kind] || a.kind), h("td", {}, badge("alert", a.status)),
      h("td", {}, a.decision || "–")))));
}

// The counts are the server's (devices per state under the other filters); a click filters by that state.
function countsBar(facets, pick) {
  const n = facets.state;
  const all = Object.values(n).reduce((a, b) => a + b, 0);
  return h("div", { class: "counts" },
    h("div", { class: "count total pick", onclick: () => pick("state", "") }, h("b", {}, all.toLocaleString("en-US")), h("span", {}, "devices")),
    STATES.map((st) => h("div", { class: `count pick c-${st}`, "data-state": st, onclick: () => pick("state", st) },
      h("b", {}, (n[st] || 0).toLocaleString("en-US")), h("span", {}, STATE_TEXT[st]))));
}

const DEVICE_COLUMNS = ["Device", "State", "Hardware", "Active model / plan", "Size vs base", "Agreement",
  "Last drift window", "Alert"];

function progressText(a) {
  const p = a.progress || {};
  if (a.status === "running" && isNum(p.total) && p.total > 0) return `${p.phase || "running"} ${Math.round((100 * p.done) / p.total)}%`;
  return a.status;
}

function analysesTable(analyses) {
  if (!analyses.length) return h("p", { class: "muted" }, "No analysis yet: register a model and start one (toco-fleet analyze).");
  return h("table", { class: "grid-table compact", id: "analyses" },
    h("thead", {}, h("tr", {}, ["Analysis", "Status", "Why", "Started", "Bundle"].map((c) => h("th", {}, c)))),
    h("tbody", {}, analyses.slice(0, 12).map((a) => h("tr", {},
      h("td", {}, h("a", { href: `/analyses/${encodeURIComponent(a.analysis_id)}` }, a.analysis_id)),
      h("td", {}, badge(a.status, progressText(a))),
      h("td", {}, a.reason || "–"),
      h("td", {}, fmtTime(a.created_at)),
      h("td", {}, shortId(a.bundle_id, 8))))));
}

function reanalysesTable(items, refresh) {
  if (!items.length) return h("p", { class: "muted" }, "None so far. A device whose drift alert holds triggers one.");
  const approve = async (id, btn) => {
    btn.disabled = true;
    try { await api(`/api/reanalyses/${encodeURIComponent(id)}/approve`, { method: "POST" }); refresh(); }
    catch (err) { btn.replaceWith(errorBox(err.message)); }
  };
  return h("table", { class: "grid-table compact", id: "reanalyses" },
    h("thead", {}, h("tr", {}, ["When", "Why", "Devices", "Status", "Analysis"].map((c) => h("th", {}, c)))),
    h("tbody", {}, items.slice(0, 10).map((r) => {
      const label = r.status === "pending_approval" ? "Approve" : r.status === "canary" && !r.group_approved_at ? "Approve group" : null;
      const btn = label ? h("button", { class: "btn small", onclick: (ev) => approve(r.reanalysis_id, ev.currentTarget) }, label) : null;
      const q = r.quorum || {};
      const quorum = r.status === "canary" ? h("div", { class: "sub" }, `canary on its trigger devices · quorum ${q.votes ?? "?"} of ${q.needed ?? "?"} (group online ${q.online ?? "?"})`) : null;
      return h("tr", {},
        h("td", {}, fmtTime(r.created_at)),
        h("td", {}, r.why || "–"),
        h("td", {}, (r.trigger_devices || []).map((id) => h("a", { href: `/devices/${encodeURIComponent(id)}`, class: "chip" }, id))),
        h("td", {}, badge(r.status, r.status.replace("_", " ")), btn, quorum),
        h("td", {}, r.analysis_id ? h("a", { href: `/analyses/${encodeURIComponent(r.analysis_id)}` }, r.analysis_id) : "–"));
    })));
}

function targetText(t) {
  if (!t) return "–";
  if (t.device) return `device ${t.device}`;
  if (t.devices) return `canary: ${t.devices.join(", ")}`;
  if (t.group) return `group ${t.group}`;
  return "all devices";
}

function deploymentsTable(items) {
  if (!items.length) return h("p", { class: "muted" }, "No deployment yet.");
  return h("table", { class: "grid-table compact", id: "deployments" },
    h("thead", {}, h("tr", {}, ["Created", "Target", "Stage", "Done", "Failed", "Expected no plan", "Bundle"].map((c) => h("th", {}, c)))),
    h("tbody", {}, items.slice(0, 10).map((d) => {
      const c = d.counts || {};
      const total = ["pending", "in_progress", "succeeded", "failed"].reduce((n, k) => n + (c[k] || 0), 0);
      return h("tr", {},
        h("td", {}, fmtTime(d.created_at)), h("td", {}, targetText(d.target)),
        h("td", {}, badge(d.stage, d.stage.replace("_", " ")), d.command === "rollback" ? badge("rollback", "version rollback") : null),
        h("td", { class: "num" }, `${c.succeeded || 0} / ${total}`),
        h("td", { class: c.failed ? "num warn" : "num" }, String(c.failed || 0)),
        expectedCell(d.expected_infeasible || []),
        h("td", {}, shortId(d.bundle_id, 8)));
    })));
}

// The server's advisory check at creation: boxes whose own caps leave the solver no plan.
// They still got the bundle; the cell names them so nobody is surprised by their refusal.
function expectedCell(warnings) {
  if (!warnings.length) return h("td", { class: "num" }, "0");
  const why = warnings.map((w) => `${w.device_id}: ${w.reason}`).join("\n");
  return h("td", { class: "num warn expected-infeasible", title: why },
    `${warnings.length} (${warnings.map((w) => w.device_id).slice(0, 3).join(", ")}${warnings.length > 3 ? ", …" : ""})`);
}

async function optional(path) {
  try { return await api(path); } catch { return []; }
}

/** Draw the overview into `root` and keep it current. */
export async function render(root) {
  const refresh = debounce(load, 250);
  for (const kind of ["device", "drift", "status", "deployment", "analysis", "reanalysis", "drift_alert"]) on(kind, refresh);
  // built once: the filter controls keep their state (and the search box its focus) across live refreshes
  const updated = h("span", { class: "muted" });
  const counts = h("div", { id: "state-counts" });
  const kinds = h("div");
  const devices = devicePages({ renderRow: deviceRow, columns: DEVICE_COLUMNS, stateText: STATE_TEXT,
    onPage: (page) => { mount(counts, countsBar(page.facets, pick)); mount(kinds, kindCounts(page.facets, pick)); } });
  const pick = (name, value) => devices.setFilter(name, value);
  const rest = h("div");
  mount(root, h("div", { class: "page-head" }, h("h1", {}, "Fleet overview"), updated),
    counts, kinds, card("Devices", devices.element), rest);

  async function load() {
    const [, analyses, reanalyses, deployments, versions, alerts] = await Promise.all([
      devices.load(), optional("/api/analyses"), optional("/api/reanalyses"), optional("/api/deployments"),
      optional("/api/groups/versions"), optional("/api/drift-alerts?active=true")]);
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    mount(rest,
      card("Model versions per group", versionsTable(versions)),
      h("div", { class: "columns" },
        card("Analyses", analysesTable(analyses)),
        card("Re-analyses triggered by drift", reanalysesTable(reanalyses, refresh))),
      card("Drift alerts that started no re-analysis", decisionsTable(alerts)),
      card("Deployments", deploymentsTable(deployments)));
  }
  await load();
  setInterval(() => refresh(), 30000); // keep the "seen ... ago" texts honest when nothing happens
}
