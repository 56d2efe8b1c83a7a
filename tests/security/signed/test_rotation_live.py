"""Key rotation end to end: a running fleet server (real mosquitto) and a real agent process.

``toco-fleet keys rotate`` on the server's data dir; the server picks it up, pushes the new key set
to the online agent (signed by the old key) and signs with the new key; retiring the old key
shrinks the agent's set; the agent keeps taking the server's commands throughout.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fleet_server.cli import app
from fleet_server.config import FleetSettings
from fleet_server.server import FleetServer
from tests.agent_e2e.conftest import FLEET, AgentProcess, Broker, wait_for
from tests.support.processes import free_port
from toco_core.messages import UploadSamplesCommand


def test_a_running_server_rotates_and_retires_keys_on_a_live_agent(tmp_path):
    broker = Broker()
    broker.start()
    server = agent = None
    try:
        server = FleetServer(FleetSettings(data_dir=tmp_path / "fleet", broker=broker.url, fleet=FLEET, tick_s=0.2,
                                           http_port=0, broker_port=free_port())).start()
        (tmp_path / "agent").mkdir()
        agent = AgentProcess(tmp_path / "agent", "box-rot", broker.url, server.public_key_path, upload_samples=True)
        agent.start()
        trust = lambda: json.loads((agent.state_dir / "trust.json").read_text())  # noqa: E731
        old = trust()["keys"][0]["fingerprint"]
        assert wait_for(lambda: _online(server, "box-rot"), 15)

        def command_runs(cmd_id: str) -> bool:
            before = trust()["highest_command"]
            server.policy.send_command("box-rot", UploadSamplesCommand(cmd_id=cmd_id))
            return wait_for(lambda: trust()["highest_command"] > before, 15)

        assert command_runs("before-rotation")
        out = CliRunner().invoke(app, ["keys", "rotate", "--overlap", "1h", "--data-dir", str(tmp_path / "fleet")])
        assert out.exit_code == 0, out.output
        assert wait_for(lambda: len(trust()["keys"]) == 2, 15), agent.log_text()
        new = server.signer.ring.active
        assert {k["fingerprint"] for k in trust()["keys"]} == {old, new} and server.key is server.signer.active_key
        assert command_runs("after-rotation")  # signed by the new key
        out = CliRunner().invoke(app, ["keys", "retire", old, "--data-dir", str(tmp_path / "fleet")])
        assert out.exit_code == 0, out.output
        assert wait_for(lambda: [k["fingerprint"] for k in trust()["keys"]] == [new], 15), agent.log_text()
        assert command_runs("after-retirement")
        assert trust()["refused"] == {}
        assert server.public_key_path.name == f"server-{new}.pub.pem"  # what new boxes are provisioned with
    finally:
        if agent is not None and agent.proc is not None:
            agent.stop()
        if server is not None:
            server.stop()
        broker.cleanup()


def _online(server: FleetServer, device: str) -> bool:
    from fleet_server.db import DeviceRow

    with server.db.session() as s:
        d = s.get(DeviceRow, device)
        return bool(d and d.online)
