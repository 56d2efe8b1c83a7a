// Small DOM helpers. Every string goes in through textContent or setAttribute, never as HTML,
// so a device id like "<img onerror=...>" shows up as text.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = String(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of [children].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "12 KB"). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace the children of an element (by id or element). */
export function mount(target, ...children) {
  const el = typeof target === "string" ? document.getElementById(target) : target;
  if (el) el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** The value of a cookie readable by scripts ("" if unset). */
function cookie(name) {
  const hit = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return hit ? decodeURIComponent(hit.slice(name.length + 1)) : "";
}

/** JSON from the API; throws Error(detail) with the server's message for people.
 *  Writes carry the session's CSRF token (X-CSRF-Token, from the toco_csrf cookie the login set);
 *  a 401 (session expired or token revoked) goes to the login page. */
export async function api(path, options = {}) {
  const init = { headers: { Accept: "application/json" }, ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
  }
  if ((init.method || "GET").toUpperCase() !== "GET") init.headers["X-CSRF-Token"] = cookie("toco_csrf");
  const r = await fetch(path, init);
  if (r.status === 401) {
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
    throw new Error("not logged in");
  }
  let body = null;
  try { body = await r.json(); } catch { body = null; }
  if (!r.ok) throw new Error((body && body.detail) || `${r.status} ${r.statusText} from ${path}`);
  return body;
}

/** Call fn at most once per `ms`, always with the latest arguments (live updates come in bursts). */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

export const isNum = (v) => typeof v === "number" && Number.isFinite(v);

export function fmtBytes(n) {
  if (!isNum(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

export function fmtPct(v, digits = 1) {
  return isNum(v) ? `${(100 * v).toFixed(digits)}%` : "–";
}

export function fmtNum(v, digits = 2) {
  if (!isNum(v)) return "–";
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(digits);
  return v.toFixed(digits);
}

export function fmtTime(t) {
  if (!isNum(t)) return "–";
  const d = new Date(t * 1000);
  const same = d.toDateString() === new Date().toDateString();
  return same ? d.toLocaleTimeString() : d.toLocaleString();
}

export function fmtAgo(t) {
  if (!isNum(t)) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 5) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A long hex id shortened for tables; the full id stays in the tooltip. */
export function shortId(id, n = 10) {
  if (!id) return h("span", { class: "muted" }, "–");
  const str = String(id);
  return h("code", { title: str }, str.length > n + 2 ? `${str.slice(0, n)}…` : str);
}

export function badge(state, text) {
  return h("span", { class: `badge b-${String(state).replace(/[^a-z_-]/gi, "")}` }, text ?? state);
}

/** A titled card section. */
export function card(title, ...body) {
  return h("section", { class: "card" }, h("h2", {}, title), ...body);
}

/** A definition list from [label, value] pairs (value: string or Node). */
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function errorBox(message) {
  return h("div", { class: "error", role: "alert" }, message);
}
