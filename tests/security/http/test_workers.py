"""Analysis workers never outlive the server: SIGTERM, SIGINT and even SIGKILL of a real `toco-fleet serve`
mid-analysis leave no worker process, and a restart runs the re-queued analysis in one worker only."""

from __future__ import annotations

import signal

import psutil

from tests.security.http.conftest import ServerProcess, make_tokens
from tests.support.waiting import wait_until


def workers(server: ServerProcess) -> list[psutil.Process]:
    """The server's analysis worker processes (spawned multiprocessing children, not its resource tracker)."""
    try:
        kids = server.process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if "spawn_main" in " ".join(_cmdline(k))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def analysing(server: ServerProcess, api, analysis_id: str) -> list[psutil.Process]:
    """Wait until a worker is inside the analysis (past start-up); returns the workers."""
    def inside() -> bool:
        a = api.get(f"/api/analyses/{analysis_id}").json()
        return (a["status"] == "running" and a["progress"]["phase"] not in ("queued", "starting")
                and bool(workers(server)))

    assert wait_until(inside, 90, 0.2), server.output()
    return workers(server)


def test_stopping_the_server_mid_analysis_ends_its_workers_and_a_restart_runs_it_once(tmp_path, lenet_upload):
    token = make_tokens(tmp_path, ("operator",))["operator"]
    server = ServerProcess(tmp_path).start()
    api = server.client(token)
    model = api.post("/api/models", files=lenet_upload, data={"name": "lenet5"}).json()
    aid = api.post(f"/api/models/{model['model_id']}/analyses", json={}).json()["analysis_id"]
    seen: set[int] = set()
    # one data dir, one analysis: each stop interrupts it, each restart re-queues it (SIGKILL first, so
    # two restarts check that the re-queued analysis runs in one fresh worker)
    stops = ((signal.SIGKILL, {-9}), (signal.SIGTERM, {143}), (signal.SIGINT, {0, 130}))
    for i, (sig, codes) in enumerate(stops):
        running = analysing(server, server.client(token), aid)
        assert len(running) == 1 and running[0].pid not in seen, "the analysis runs in one fresh worker"
        seen.add(running[0].pid)
        assert server.stop(sig) in codes, server.output()
        # SIGTERM/SIGINT: the server ends its workers before it exits; SIGKILL: the orphan ends itself in a second
        _, alive = psutil.wait_procs(running, timeout=5 if sig == signal.SIGKILL else 1)
        assert not alive, f"worker {[p.pid for p in alive]} outlived the server ({signal.Signals(sig).name})"
        if i < len(stops) - 1:
            server = ServerProcess(tmp_path).start()
