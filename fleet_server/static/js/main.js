// Picks the view named by the shell's <body data-view> and starts live updates.

import { mount, errorBox } from "./dom.js";
import { connect } from "./live.js";

const VIEWS = {
  overview: () => import("./overview.js"),
  device: () => import("./device.js"),
  analysis: () => import("./analysis.js"),
};

async function start() {
  const name = document.body.dataset.view;
  const load = VIEWS[name];
  if (!load) { mount("app", errorBox(`Unknown page "${name}".`)); return; }
  connect(); // before the first fetch, so no event between fetch and subscribe is lost
  try {
    const view = await load();
    await view.render(document.getElementById("app"));
    document.body.dataset.ready = "1";
  } catch (err) {
    mount("app", errorBox(String(err.message || err)));
    document.body.dataset.ready = "error";
  }
}

start();
