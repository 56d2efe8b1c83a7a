// The overview's device table, one page at a time: filter controls (state, group, alert kind,
// version, id search), the filter's total and page navigation over GET /api/devices?... .
// A fleet of 10,000 devices is never drawn whole: the server pages and counts (keyset cursors),
// the page only ever holds `LIMIT` rows.

import { h, mount, api, debounce, errorBox } from "./dom.js";

export const LIMIT = 50;
const ALERTS = [["any", "any alert"], ["fidelity", "fidelity drift"], ["data", "new data"],
  ["unclassified", "classifying"], ["none", "no alert"]];
const FILTERS = ["state", "group", "alert", "version", "q"];

function fmtCount(n) {
  return Number(n || 0).toLocaleString("en-US");
}

/** A <select> whose options are [value, label] pairs after an "any" option; keeps `value` selected. */
function fillSelect(select, anyLabel, options, value) {
  const known = options.some(([v]) => v === value);
  const all = [["", anyLabel], ...options, ...(value && !known ? [[value, `${value} (0)`]] : [])];
  select.replaceChildren(...all.map(([v, label]) => h("option", { value: v }, label)));
  select.value = value || "";
}

function versionLabel(v) {
  return v.model_id ? `${v.name} v${v.version}` : "no known version";
}

/**
 * The paged device list.
 * renderRow(device) -> <tr>; columns: header texts; onPage(page) gets every loaded DevicePage (its facets
 * feed the overview's counts). Returns { element, load, setFilter }: load() fetches the current page
 * again (live updates), setFilter(name, value) filters and goes back to the first page.
 */
export function devicePages({ renderRow, columns, stateText, onPage }) {
  const filters = Object.fromEntries(FILTERS.map((f) => [f, ""]));
  let cursors = []; // the cursor of every page before the current one: "previous" pops it
  let cursor = null;
  let seq = 0; // a slow answer to an older request must not overwrite a newer one

  const selects = {
    state: h("select", { id: "filter-state", "aria-label": "state" }),
    group: h("select", { id: "filter-group", "aria-label": "group" }),
    alert: h("select", { id: "filter-alert", "aria-label": "alert kind" }),
    version: h("select", { id: "filter-version", "aria-label": "model version" }),
  };
  const search = h("input", { id: "filter-q", type: "search", placeholder: "Search device id", maxlength: "64",
    "aria-label": "search device id" });
  const summary = h("span", { id: "devices-summary", class: "muted" });
  const prev = h("button", { id: "page-prev", class: "btn small", type: "button" }, "‹ Previous");
  const next = h("button", { id: "page-next", class: "btn small", type: "button" }, "Next ›");
  const pageInfo = h("span", { id: "page-info", class: "muted" });
  const body = h("div", { class: "table-wrap" });

  function setFilter(name, value) {
    filters[name] = value || "";
    if (name === "q") search.value = filters.q;
    else if (selects[name]) selects[name].value = filters[name];
    cursors = [];
    cursor = null;
    return load();
  }
  for (const [name, select] of Object.entries(selects)) select.addEventListener("change", () => setFilter(name, select.value));
  const typed = debounce(() => setFilter("q", search.value.trim()), 250);
  search.addEventListener("input", typed);
  prev.addEventListener("click", () => { cursor = cursors.pop() ?? null; load(); });
  next.addEventListener("click", () => {
    if (!next.dataset.cursor) return;
    cursors.push(cursor);
    cursor = next.dataset.cursor;
    load();
  });

  function query() {
    const params = new URLSearchParams({ limit: String(LIMIT) });
    for (const f of FILTERS) if (filters[f]) params.set(f, filters[f]);
    if (cursor) params.set("cursor", cursor);
    return params.toString();
  }

  function draw(page) {
    const f = page.facets;
    fillSelect(selects.state, "any state", Object.entries(f.state).map(([st, n]) => [st, `${stateText[st] || st} (${fmtCount(n)})`]), filters.state);
    fillSelect(selects.group, "every group", Object.entries(f.group).map(([g, n]) => [g, `${g} (${fmtCount(n)})`]), filters.group);
    fillSelect(selects.alert, "alert or not", ALERTS.map(([k, label]) => [k, k in f.alert ? `${label} (${fmtCount(f.alert[k])})` : label]), filters.alert);
    fillSelect(selects.version, "any version", f.version.map((v) => [v.model_id || "none", `${versionLabel(v)} (${fmtCount(v.devices)})`]), filters.version);
    const first = cursors.length * LIMIT;
    summary.dataset.total = String(page.total);
    summary.textContent = page.total
      ? `${fmtCount(first + 1)}–${fmtCount(first + page.devices.length)} of ${fmtCount(page.total)} devices`
      : "0 devices";
    pageInfo.textContent = `page ${cursors.length + 1} of ${Math.max(1, Math.ceil(page.total / LIMIT))}`;
    prev.disabled = cursors.length === 0;
    next.disabled = !page.next_cursor;
    next.dataset.cursor = page.next_cursor || "";
    if (!page.devices.length) {
      const filtered = FILTERS.some((name) => filters[name]);
      mount(body, h("p", { class: "muted", id: "devices-empty" }, filtered
        ? "No device matches these filters."
        : "No device has reported yet. Agents appear here as soon as they connect to the broker."));
      return;
    }
    mount(body, h("table", { id: "devices", class: "grid-table" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
      h("tbody", {}, page.devices.map(renderRow))));
  }

  async function load() {
    const mine = ++seq;
    let page;
    try {
      page = await api(`/api/devices?${query()}`);
    } catch (err) {
      if (mine === seq) mount(body, errorBox(err.message));
      return;
    }
    if (mine !== seq) return;
    draw(page);
    onPage(page);
  }

  const element = h("div", { class: "device-pages" },
    h("div", { class: "filters" }, search, Object.values(selects), summary),
    body,
    h("div", { class: "pager" }, prev, pageInfo, next));
  return { element, load, setFilter };
}
