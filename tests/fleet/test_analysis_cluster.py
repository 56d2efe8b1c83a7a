"""Analyses on a real Dask cluster: a scheduler and two workers started with the `dask` CLI, as a user
runs them, and the fleet server's JobRunner pointed at it (executor=tcp://...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from fleet_server.config import FleetSettings
from tests.fleet.conftest import FAST, Fleet
from tests.support.processes import free_port, stop_process
from tests.support.waiting import wait_until
from toco_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).with_name("dask"))


class Cluster:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1 (workers without a nanny, so a
    killed worker stays dead); their logs in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the workers import fleet_server and toco_core
        self.procs: list[subprocess.Popen] = []
        self.logs: list[BinaryIO] = []
        self._start(tmp / "scheduler.log", ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                             "--no-dashboard"], env)
        for k in range(2):
            self._start(tmp / f"worker-{k}.log", ["worker", self.address, "--nthreads", "1", "--no-nanny",
                                                   "--no-dashboard", "--name", f"w{k}"], env)
        from distributed import Client

        self.client = Client(self.address, timeout=30, set_as_default=False)
        self.client.wait_for_workers(2, timeout=60)

    def _start(self, log_path: Path, args: list[str], env: dict) -> None:
        log = open(log_path, "wb")  # noqa: SIM115 - the child writes it until stop()
        self.logs.append(log)
        self.procs.append(subprocess.Popen([DASK, *args], env=env, stdout=log, stderr=subprocess.STDOUT))

    def worker_pid(self, address: str) -> int:
        """The pid of the worker at ``address`` (a --no-nanny worker is the `dask worker` process itself)."""
        return int(self.client.run(os.getpid, workers=[address])[address])

    def stop(self) -> None:
        self.client.close()
        for p in reversed(self.procs):
            stop_process(p)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cluster_fleet(cluster, tmp_path_factory) -> Iterator[Fleet]:
    """A fleet server whose analyses run on the cluster; every ``analysis`` event it publishes is in ``.seen``."""
    f = Fleet(tmp_path_factory.mktemp("fleet-dask"), "embedded", executor=cluster.address)
    seen: list[dict] = []
    lock = threading.Lock()
    publish = f.server.events.publish

    def record(kind, data):
        if kind == "analysis":
            with lock:
                seen.append(dict(data))
        publish(kind, data)

    f.server.events.publish = record  # type: ignore[method-assign]
    f.seen = seen  # type: ignore[attr-defined]
    yield f
    f.stop()


def _start_analysis(fleet: Fleet, lenet: dict) -> str:
    m = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]), "pool": ("p.npz", lenet["pool"])},
                       data={"name": "lenet5"})
    m.raise_for_status()
    a = fleet.api.post(f"/api/models/{m.json()['model_id']}/analyses", json={"budget": 0.05})
    a.raise_for_status()
    return a.json()["analysis_id"]


def _events(fleet: Fleet, aid: str) -> list[dict]:
    return [e for e in fleet.seen if e.get("analysis_id") == aid]  # type: ignore[attr-defined]


def _phase(event: dict) -> str:
    return event["progress"]["phase"]


def _finished(fleet: Fleet, aid: str, timeout: float = 150) -> dict:
    assert wait_until(lambda: fleet.api.get(f"/api/analyses/{aid}").json()["status"] in ("done", "failed"),
                      timeout=timeout, step=0.5)
    return fleet.api.get(f"/api/analyses/{aid}").json()


def test_unreachable_scheduler_is_one_clear_error() -> None:
    from fleet_server.analysis_cluster import check_scheduler

    with pytest.raises(ConfigError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:\d+"):
        check_scheduler(f"tcp://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ConfigError, match="neither 'local' nor a Dask scheduler address"):
        FleetSettings(executor="127.0.0.1:8786")


def test_cancel_a_running_cluster_analysis(cluster_fleet, cluster, lenet) -> None:
    aid = _start_analysis(cluster_fleet, lenet)
    # running on a worker: its progress came back from the cluster
    assert wait_until(lambda: any(_phase(e) == "load" for e in _events(cluster_fleet, aid)), timeout=60, step=0.2)
    r = cluster_fleet.api.post(f"/api/analyses/{aid}/cancel")
    assert r.status_code == 200, r.text
    a = _finished(cluster_fleet, aid, timeout=15)
    assert (a["status"], a["error"]) == ("failed", "cancelled")
    # the task itself stopped at its next progress step: no worker is busy with it any more
    assert wait_until(lambda: not any(cluster.client.processing().values()), timeout=30, step=0.5)
    assert cluster_fleet.api.post(f"/api/analyses/{aid}/cancel").status_code == 409  # ended already


def test_cluster_analysis_matches_the_local_calibration(cluster_fleet, lenet) -> None:
    aid = _start_analysis(cluster_fleet, lenet)
    a = _finished(cluster_fleet, aid)
    assert a["status"] == "done", a["error"]
    phases = {_phase(e) for e in _events(cluster_fleet, aid)}
    assert {"load", "qbc", "prune", "calibrate", "done"} <= phases
    calibrating = [e["progress"] for e in _events(cluster_fleet, aid) if _phase(e) == "calibrate"]
    assert len(calibrating) > 70  # the grid points measured on the cluster report too
    assert _phase(cluster_fleet.api.get(f"/api/analyses/{aid}").json()) == "done"  # no late report turned it back

    # the same calibration, run locally with the builtin map on the inputs the cluster run saved
    import onnx

    from toco_core.analysis.pipeline import calibrate
    from toco_core.analysis_result import load_result
    from toco_core.compression.compensated_rounding import layer_hessians
    from toco_core.onnx_model import compressible_weights, output_kind, read_weights
    from toco_core.output_tail import scored_head, scored_output

    result = load_result(Path(cluster_fleet.server.store.analysis_dir(aid)))
    model = onnx.load_model_from_string(lenet["onnx"])
    settings = FAST
    head = scored_head(model, scored_output(model, settings.output))
    infos = compressible_weights(head)
    assert result.tolerances is not None
    hessians = layer_hessians(head, infos, result.analysis_x) if settings.compensated_rounding else None
    curves, table, deltas, rounding = calibrate(head, infos, read_weights(head, infos), result.tolerances,
                                                output_kind(head), result.heldout_x, result.heldout_y, lambda *_: None,
                                                result.analysis_x if settings.bias_correction else None,
                                                hessians=hessians)
    # the analysis' last step (storage forms) adds each point's built size; calibrate measures the rest
    saved = result.curves["prune+quantize"]
    assert all(p.storage_bytes for p in saved.points if p.quant_scale > 0)
    sizes = {"points": {"__all__": {"storage_bytes"}}}
    assert {k: c.model_dump(exclude=sizes) for k, c in curves.items()} == \
        {k: c.model_dump(exclude=sizes) for k, c in result.curves.items()}
    assert result.plans is not None and table.points == result.plans.points
    assert all((table.octaves[n] == result.plans.octaves[n]).all() for n in table.tensors)
    # the bias deltas measured on the workers came back with their points and were kept
    assert settings.bias_correction and result.bias_deltas is not None and deltas.keys() == result.bias_deltas.keys()
    assert all((deltas[i][b] == result.bias_deltas[i][b]).all() for i in deltas for b in deltas[i])
    # and so did the code differences of compensated rounding
    assert (rounding is None) == (result.rounding is None) == (not settings.compensated_rounding)
    assert rounding == result.rounding


def test_worker_killed_mid_analysis(cluster_fleet, cluster, lenet) -> None:
    aid = _start_analysis(cluster_fleet, lenet)
    jobs = cluster_fleet.server.jobs
    assert jobs._cluster is not None
    attempts = jobs._cluster._attempts
    # the analysis is under way on one worker (its QBC phase reported)
    assert wait_until(lambda: aid in attempts and any(_phase(e) == "qbc" for e in _events(cluster_fleet, aid)),
                      timeout=90, step=0.2)
    lost = attempts[aid][0]
    os.kill(cluster.worker_pid(lost), signal.SIGKILL)
    a = _finished(cluster_fleet, aid)
    # the scheduler re-ran it on the other worker, and it completed there
    assert a["status"] == "done", a["error"]
    notes = [e["note"] for e in _events(cluster_fleet, aid) if e.get("note")]
    assert len(notes) == 1 and f"the Dask worker {lost} running this analysis was lost" in notes[0]
    assert any(_phase(e) == "restarted" for e in _events(cluster_fleet, aid))


def test_cancel_local_analyses(lenet, tmp_path) -> None:
    f = Fleet(tmp_path, "embedded")  # executor "local": the spawn process pool, one worker
    try:
        aid = _start_analysis(f, lenet)
        assert wait_until(lambda: f.api.get(f"/api/analyses/{aid}").json()["progress"]["phase"] in ("load", "qbc"),
                          timeout=60, step=0.2)
        # a second one waits for the only worker: cancelled while queued, it never starts
        queued = _start_analysis(f, lenet)
        q = f.api.post(f"/api/analyses/{queued}/cancel").json()
        assert (q["status"], q["error"], q["started_at"]) == ("failed", "cancelled", None)
        assert f.api.post(f"/api/analyses/{aid}/cancel").status_code == 200  # running: its process is ended
        a = _finished(f, aid, timeout=20)
        assert (a["status"], a["error"]) == ("failed", "cancelled")
        assert f.api.get(f"/api/analyses/{queued}").json()["started_at"] is None
    finally:
        f.stop()
