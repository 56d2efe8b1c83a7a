"""``toco-fleet serve``'s MQTT settings: flags over TOCO_FLEET_* over a TOML config file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

import fleet_server.serve_process
from fleet_server.cli import app
from fleet_server.config import load_settings
from toco_core.errors import ConfigError

TOML = """
fleet = "plant1"
broker = "mqtts://broker.example:8883"
mqtt_username = "toco-server"
mqtt_password_file = "{pw}"
mqtt_ca_file = "/etc/toco-fleet/ca.crt"
http_port = 9000
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    for var in ("HTTP_PORT", "MQTT_USERNAME", "MQTT_PASSWORD", "FLEET", "BROKER"):
        monkeypatch.delenv(f"TOCO_FLEET_{var}", raising=False)
    (tmp_path / "server.password").write_text("from-the-file\n")
    path = tmp_path / "fleet.toml"
    path.write_text(TOML.format(pw=tmp_path / "server.password"))
    return path


def test_file_then_environment_then_flags(config, monkeypatch):
    s = load_settings(config)
    assert (s.fleet, s.broker, s.mqtt_username, s.mqtt_ca_file, s.http_port) == (
        "plant1", "mqtts://broker.example:8883", "toco-server", "/etc/toco-fleet/ca.crt", 9000)
    assert s.broker_password == "from-the-file"
    monkeypatch.setenv("TOCO_FLEET_HTTP_PORT", "9100")
    monkeypatch.setenv("TOCO_FLEET_MQTT_PASSWORD", "from-the-env")
    s = load_settings(config)
    assert s.http_port == 9100 and s.broker_password == "from-the-env"
    assert load_settings(config, http_port=9200).http_port == 9200


def test_bad_config_files_are_refused(config, tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_settings(tmp_path / "missing.toml")
    config.write_text("fleet = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config)
    config.write_text('mqtt_user = "typo"\n')
    with pytest.raises(ValidationError):
        load_settings(config)


def test_serve_flags_reach_the_server(config, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(fleet_server.serve_process, "serve", lambda settings: seen.setdefault("s", settings))
    other = tmp_path / "other.password"
    other.write_text("from-the-flag\n")
    monkeypatch.setenv("TOCO_FLEET_MQTT_PASSWORD", "from-the-env")  # the flag's file still wins
    out = CliRunner().invoke(app, ["serve", "--config", str(config), "--mqtt-username", "toco-server-2",
                                   "--mqtt-password-file", str(other), "--mqtt-ca-file", "/tmp/ca.pem"])
    assert out.exit_code == 0, out.output
    s = seen["s"]
    assert (s.fleet, s.mqtt_username, s.broker_password, s.mqtt_ca_file) == ("plant1", "toco-server-2",
                                                                             "from-the-flag", "/tmp/ca.pem")
    config.write_text('mqtt_user = "typo"\n')
    out = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert out.exit_code == 2 and out.output.startswith("error: invalid mqtt_user") and out.output.count("\n") == 1
