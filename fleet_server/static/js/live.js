// One EventSource on /api/events for the page; views register handlers per event kind.
// The browser reconnects by itself; the pill in the top bar says whether updates flow.

const KINDS = ["device", "telemetry", "drift", "status", "analysis", "deployment", "reanalysis", "drift_alert"];
const handlers = new Map(KINDS.map((k) => [k, []]));
let source = null;

function setPill(state, text) {
  const pill = document.getElementById("live");
  if (!pill) return;
  pill.dataset.state = state;
  pill.textContent = text;
}

/** Call fn(data) for every event of `kind` (one of KINDS). */
export function on(kind, fn) {
  if (!handlers.has(kind)) throw new Error(`unknown event kind ${kind}`);
  handlers.get(kind).push(fn);
}

/** Open the stream (once). */
export function connect() {
  if (source) return source;
  source = new EventSource("/api/events");
  source.onopen = () => setPill("live", "live");
  source.onerror = () => setPill(source.readyState === EventSource.CLOSED ? "down" : "connecting",
    source.readyState === EventSource.CLOSED ? "no live updates" : "reconnecting");
  for (const kind of KINDS) {
    source.addEventListener(kind, (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      document.body.dataset.lastEvent = kind;
      for (const fn of handlers.get(kind)) {
        try { fn(data); } catch (err) { console.error(`handling a ${kind} event failed`, err); }
      }
    });
  }
  return source;
}
