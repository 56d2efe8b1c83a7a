"""toco-fleet against a running server: tables, and one-line errors for bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from tests.fleet.conftest import device_json, wait_until


@pytest.mark.parametrize("fleet", ["embedded"], indirect=True)
def test_cli_tables_and_errors(fleet, devices):
    run = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token})
    url = ["--server", fleet.http.url]
    dev = devices("cli-dev")
    assert wait_until(lambda: device_json(fleet, "cli-dev").get("online"))
    dev.drift(3, "0" * 64, alert=True, agreement=0.5)  # a bundle the server did not build: no re-analysis
    assert wait_until(lambda: len(fleet.api.get("/api/drift?device_id=cli-dev").json()) == 1)
    out = run.invoke(app, ["devices", "list", *url])
    assert out.exit_code == 0 and "cli-dev" in out.output
    out = run.invoke(app, ["drift", "--device", "cli-dev", *url])
    assert out.exit_code == 0 and "ALERT" in out.output and "50.0%" in out.output
    out = run.invoke(app, ["models", "list", *url])
    assert out.exit_code == 0 and "lenet5" in out.output
    out = run.invoke(app, ["deploy", fleet.analysis["analysis_id"], *url])
    assert out.exit_code == 2 and "--device" in out.output
    out = run.invoke(app, ["rollback", "d-nope", *url])
    assert out.exit_code == 2 and "404" in out.output and "d-nope" in out.output
    out = run.invoke(app, ["devices", "list", "--server", "http://127.0.0.1:9"])
    assert out.exit_code == 2 and "cannot reach" in out.output


@pytest.mark.parametrize("fleet", ["embedded"], indirect=True)
def test_cli_deploy_warns_about_a_box_its_caps_leave_no_plan(fleet, devices):
    devices("cli-tiny", group="cli-warn", hardware={"storage_budget": 2000})  # 2 KB for a 250 KB model
    assert wait_until(lambda: device_json(fleet, "cli-tiny").get("online"))
    out = CliRunner(env={"TOCO_FLEET_TOKEN": fleet.token}).invoke(
        app, ["deploy", fleet.analysis["analysis_id"], "--group", "cli-warn", "--server", fleet.http.url])
    assert out.exit_code == 0, out.output
    assert "warning: cli-tiny will likely refuse it" in " ".join(out.output.split()) and "storage" in out.output
