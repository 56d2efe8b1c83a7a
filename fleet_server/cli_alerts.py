"""``toco-fleet alerts``: drift alerts and what an operator does with them (over the HTTP API).

    toco-fleet alerts list [--device ID] [--all]
    toco-fleet alerts accept ALERT_ID [--group]    the new data is normal: rebase the reference
    toco-fleet alerts ack ALERT_ID
    toco-fleet alerts reanalyse ALERT_ID           re-analyse anyway (data drift, cooldown, cap)

A retrained model is registered with ``toco-fleet models add``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.table import Table

from toco_core.cli_support import cli_errors, console

Call = Callable[..., Any]  # (server, method, path, **httpx kwargs) -> JSON; raises TocoError


def make_alerts_app(call: Call, server_option) -> typer.Typer:
    """The ``alerts`` command group, calling the server with ``call`` (toco-fleet's HTTP helper)."""
    app = typer.Typer(help="Drift alerts: fidelity drift (re-analysed) or data drift (an operator decides).",
                      no_args_is_help=True)

    @app.command("list")
    @cli_errors
    def alerts_list(device: str | None = typer.Option(None, help="one device's alerts"),
                    all_alerts: bool = typer.Option(False, "--all", help="closed alerts too"),
                    server: str = server_option) -> None:
        """Active drift alerts: kind, status, and what the server decided and why."""
        params = {"active": str(not all_alerts).lower(), **({"device_id": device} if device else {})}
        t = Table("alert", "device", "group", "kind", "status", "decision")
        for a in call(server, "GET", "/api/drift-alerts", params=params):
            t.add_row(a["alert_id"], a["device_id"], a["group"], a["kind"], a["status"], a["decision"])
        console.print(t)

    @app.command("accept")
    @cli_errors
    def alerts_accept(alert_id: str, group: bool = typer.Option(False, "--group", help="rebase the whole group"),
                      server: str = server_option) -> None:
        """Accept the new data as normal: the device (or group) rebases its drift reference on it."""
        a = call(server, "POST", f"/api/drift-alerts/{alert_id}/accept", json={"scope": "group" if group else "device"})
        console.print(f"alert {a['alert_id']}: {a['status']}")

    @app.command("ack")
    @cli_errors
    def alerts_ack(alert_id: str, server: str = server_option) -> None:
        """Acknowledge an alert (nothing changes on the device)."""
        a = call(server, "POST", f"/api/drift-alerts/{alert_id}/acknowledge")
        console.print(f"alert {a['alert_id']}: {a['status']}")

    @app.command("reanalyse")
    @cli_errors
    def alerts_reanalyse(alert_id: str, server: str = server_option) -> None:
        """Re-analyse with the device's field samples anyway (data drift, cooldown or daily cap notwithstanding)."""
        a = call(server, "POST", f"/api/drift-alerts/{alert_id}/reanalyse")
        console.print(f"alert {a['alert_id']}: {a['status']} ({a['decision']})")

    return app
