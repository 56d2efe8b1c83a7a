"""The deployment phase of bench/fleet.py: the demo LeNet-5 analysed and deployed to group "deploy"."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from bench._fleet_sim import Devices


class DeployFailed(Exception):
    """The deployment phase could not run to its end: what failed, for the table's row."""


# POST /api/deployments signs and publishes a command per device before it answers: thousands of
# devices on a loaded box take longer than the client's default timeout
DEPLOY_POST_TIMEOUT_S = 600.0


def _checked(r: httpx.Response, what: str) -> dict:
    """The JSON of a 2xx response. Raises DeployFailed naming ``what`` and the server's answer otherwise."""
    if r.is_error:
        raise DeployFailed(f"{what}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


# called with the deployment's current view while the bench waits for it (e.g. to kill the leader halfway)
Watch = Callable[[dict], None]


def deploy_demo_model(api: httpx.Client, watch: Watch | None = None, wait_s: float = 180.0) -> tuple[dict, float]:
    """Analyse the demo LeNet-5 and deploy it to group "deploy" at once; ``watch(view)`` sees every poll;
    the deployment is followed for at most ``wait_s`` seconds.

    Returns (final deployment, seconds to done). Raises DeployFailed for an HTTP error answer, a failed or
    unfinished analysis; httpx.HTTPError (a timeout, a refused connection) passes through.
    """
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    pool = io.BytesIO()
    d = mnist_splits()
    np.savez(pool, x=d.x_pool[:120], y=d.y_pool[:120])
    m = _checked(api.post("/api/models", files={"file": ("m.onnx", Path(demo_model("lenet5")).read_bytes()),
                                                "pool": ("p.npz", pool.getvalue())}, data={"name": "lenet5"}),
                 "POST /api/models")
    a = _checked(api.post(f"/api/models/{m['model_id']}/analyses", json={"budget": 0.05}), "POST analyses")
    t_an = time.monotonic()
    while (a := _checked(api.get(f"/api/analyses/{a['analysis_id']}"), "GET analysis"))["status"] not in (
            "done", "failed"):
        if time.monotonic() - t_an > 300:
            raise DeployFailed(f"analysis did not finish in 300 s: status {a['status']}")
        time.sleep(0.5)
    if a["status"] != "done":
        raise DeployFailed(f"the demo model's analysis failed, nothing to deploy: {a.get('error')}")
    print(f"analysis done in {time.monotonic() - t_an:.0f} s; deploying", flush=True)
    t_dep = time.monotonic()
    # the whole group at once (canary_share 1): this measures transfer + status handling, not staging
    dep = _checked(api.post("/api/deployments", json={"analysis_id": a["analysis_id"], "target": {"group": "deploy"},
                                                      "canary_share": 1.0}, timeout=DEPLOY_POST_TIMEOUT_S),
                   "POST /api/deployments")
    print(f"deployment {dep['deployment_id']} created in {time.monotonic() - t_dep:.1f} s", flush=True)
    while True:
        cur = _checked(api.get(f"/api/deployments/{dep['deployment_id']}"), "GET /api/deployments/{id}")
        if cur["stage"] in ("done", "stopped") or time.monotonic() - t_dep > wait_s:
            return cur, time.monotonic() - t_dep
        if watch is not None:
            watch(cur)
        time.sleep(0.2)


def deploy_phase(args, api: httpx.Client, devices: Devices,
                 watch: Watch | None = None) -> tuple[bool, list[tuple[str, object]]]:
    """Analyse the demo model and deploy it to group "deploy". Returns (whether the phase ran to its end,
    the deployment table's rows; a failed phase's row says what failed)."""
    print(f"analysing the demo model for the deployment to {args.deploy_devices} devices", flush=True)
    t_phase = time.monotonic()
    try:
        cur, dep_s = deploy_demo_model(api, watch, args.deploy_wait)
    except (DeployFailed, httpx.HTTPError) as exc:
        what = str(exc)
        if isinstance(exc, httpx.HTTPError):  # a timeout's message is often empty: name the error and request
            try:
                what = f"{type(exc).__name__} on {exc.request.method} {exc.request.url.path} {what}".strip()
            except RuntimeError:  # an error raised before its request was built
                what = f"{type(exc).__name__} {what}".strip()
        return False, [("deployment devices", args.deploy_devices),
                       ("deployment FAILED", f"{what} (after {time.monotonic() - t_phase:.0f} s)")]
    return True, [
        ("deployment devices", sum(cur["counts"].values())), ("deployment stage", cur["stage"]),
        ("deployment counts", cur["counts"]), ("deployment time to all-complete s", f"{dep_s:.1f}"),
        ("part bytes received by the deployed devices", f"{(sim := devices.stats())['part_bytes']:,}"),
        ("part ranges the simulated devices asked for again (no frame for 10 s, then backing off)",
         f"{sim['part_rerequests']:,}"),
        ("parts fetches the simulated devices gave up (transfer_stalled)", f"{sim['part_stalls']:,}"),
        ("box load average (1 min) at the end", f"{os.getloadavg()[0]:.1f}")]


