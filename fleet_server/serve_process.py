"""The ``toco-fleet serve`` process: the whole server with uvicorn in the foreground until SIGTERM or Ctrl-C,
then a stop bounded in time (docs/design_notes.md, "Stopping within seconds")."""

from __future__ import annotations

import gc
import logging
import signal
import threading

from fleet_server.config import FleetSettings
from fleet_server.server import FleetServer
from toco_core.stop_deadline import exit_if_stuck

log = logging.getLogger("toco.fleet.server")


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, ORM metadata, routes) out of the garbage collector's reach.

    They live as long as the process; without this, each full collection walks them all and
    pauses every thread for 50-100 ms, which is the API's tail latency under MQTT load
    (measured with bench/fleet.py). Call once, after start-up, in a server process.
    """
    gc.collect()
    gc.freeze()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


SHUTDOWN_GRACE_S = 2  # uvicorn's wait for open requests (event streams) on SIGTERM
STOP_DEADLINE_S = 8.0  # the whole stop; past it the process ends regardless (its supervisor expects it to)


def _report_stuck() -> None:
    """What the stop's deadline says before it ends the process: the threads still running."""
    names = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
    log.error("the server did not stop in time; exiting now", extra={"fields": {
        "deadline_s": STOP_DEADLINE_S, "threads": names[:20]}})
    logging.shutdown()


def serve(settings: FleetSettings) -> None:
    """Run the whole server until Ctrl-C or SIGTERM (uvicorn in the foreground), then stop every part,
    the analysis worker processes included."""
    import uvicorn

    from fleet_server.api import create_app

    # uvicorn ends its loop on SIGTERM and then raises the signal again with the handler found at start;
    # the default one would end the process before the `finally` below and leave the workers running
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = FleetServer(settings)
    server.exit_on_lease_loss = True
    server.start()
    app = create_app(server)
    freeze_startup_heap()
    class Http(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # open dashboard event streams never end by themselves, and uvicorn waits for open responses
            server.events.close()
            super().handle_exit(sig, frame)

    try:
        # the grace period: what still runs after it (a slow request) is cancelled
        Http(uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    finally:
        exit_if_stuck(STOP_DEADLINE_S, _report_stuck)
        server.stop()
