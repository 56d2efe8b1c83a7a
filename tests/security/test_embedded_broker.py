"""The embedded broker (amqtt) admits anonymous clients, so it listens on 127.0.0.1 alone: any
other address is refused with a typed error (one line from ``toco-fleet serve``) unless it has a
password file, and then anonymous and wrong-password clients are refused while the server's
own user connects."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from fleet_server.broker import BrokerBindError, EmbeddedBroker, password_line
from fleet_server.cli import app
from fleet_server.config import FleetSettings
from fleet_server.server import FleetServer
from tests.fleet.conftest import free_port, wait_until
from toco_core.errors import ConfigError


@pytest.mark.parametrize("host", ["127.0.0.2", "0.0.0.0", "localhost"])
def test_an_anonymous_embedded_broker_listens_on_loopback_only(tmp_path, host):
    with pytest.raises(BrokerBindError, match=f"127.0.0.1 only, not {host}"):
        EmbeddedBroker(host, free_port())
    with pytest.raises(BrokerBindError):
        FleetServer(FleetSettings(data_dir=tmp_path / "fleet", broker_host=host, broker_port=free_port()))
    assert not (tmp_path / "fleet").exists(), "refused, yet it made its data directory first"
    out = CliRunner().invoke(app, ["serve", "--broker-host", host, "--data-dir", str(tmp_path / "fleet")])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.startswith("error: the embedded broker admits anonymous clients")
    assert "--broker-password-file" in out.output


def _connect(port: int, host: str, user: str | None, password: str | None) -> bool:
    """Whether the broker at host:port accepts this user/password (None: anonymous)."""
    answer: dict = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{user}")
    if user is not None:
        c.username_pw_set(user, password)

    def on_connect(cl, u, f, rc, p):
        answer.setdefault("ok", not rc.is_failure)
        done.set()

    c.on_connect = on_connect
    c.connect(host, port)
    c.loop_start()
    assert done.wait(5), "no CONNACK"
    c.disconnect()
    c.loop_stop()
    return answer["ok"]


def test_with_a_password_file_it_may_listen_elsewhere_and_refuses_strangers(tmp_path):
    users = tmp_path / "broker-users"
    users.write_text(password_line("toco-server", "server-pw") + "\n" + password_line("cam-07", "cam-pw") + "\n")
    (tmp_path / "server.password").write_text("server-pw\n")
    port = free_port()
    with pytest.raises(ConfigError, match="no MQTT user of its own"):
        FleetServer(FleetSettings(data_dir=tmp_path / "fleet", broker_host="127.0.0.2", broker_port=port,
                                  broker_password_file=users))
    server = FleetServer(FleetSettings(data_dir=tmp_path / "fleet", broker_host="127.0.0.2", broker_port=port,
                                       broker_password_file=users, mqtt_username="toco-server",
                                       mqtt_password_file=tmp_path / "server.password", fleet="sec")).start()
    try:
        assert wait_until(lambda: server.health()["broker"] == "connected", 10)
        assert _connect(port, "127.0.0.2", "cam-07", "cam-pw")
        assert not _connect(port, "127.0.0.2", None, None), "an anonymous client got in"
        assert not _connect(port, "127.0.0.2", "cam-07", "server-pw"), "a wrong password got in"
    finally:
        server.stop()
