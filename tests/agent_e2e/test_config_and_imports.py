"""The agent config (TOML + env, strict) and the agent importing where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.config import load_config
from tests.agent_e2e.conftest import REPO
from toco_core.errors import ConfigError


def test_toml_with_units_and_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-7"\npublic_key = "/k.pem"\nstorage_cap = "2MiB"\nlatency_cap = "5ms"\n'
                    'fidelity_budget = "2%"\n[drift]\nwindow_max_samples = 64\n')
    monkeypatch.setenv("TOCO_AGENT_FLEET", "line-3")
    monkeypatch.setenv("TOCO_AGENT_DRIFT__WINDOW_MIN_SAMPLES", "16")
    monkeypatch.setenv("TOCO_AGENT_STORAGE_CAP", "1MB")
    cfg = load_config(path)
    assert (cfg.device_id, cfg.fleet, cfg.storage_cap, cfg.latency_cap, cfg.fidelity_budget) == \
        ("cam-7", "line-3", 1_000_000, 0.005, 0.02)
    assert (cfg.drift.window_max_samples, cfg.drift.window_min_samples) == (64, 16)
    assert cfg.api_host == "127.0.0.1"  # loopback unless configured


@pytest.mark.parametrize("text, match", [
    ('device_id = "a"\npublic_key = "/k"\nbogus = 1\n', "unknown key 'bogus'"),
    ('device_id = "a"\npublic_key = "/k"\n[drift]\nwindow_max = 3\n', "unknown key 'drift.window_max'"),
    ('public_key = "/k"\n', "missing required value 'device_id' in .*agent.toml.*TOCO_AGENT_DEVICE_ID"),
    ('device_id = "a"\npublic_key = "/k"\nmemory_cap = "12 parsecs"\n', "invalid 'memory_cap'.*parsecs"),
    ('device_id = "a"\npublic_key = "/k"\nbroker_url = "http://x"\n', "mqtt:// or mqtts://"),
    ('device_id = "a/b"\npublic_key = "/k"\n', "invalid 'device_id'"),
    ('device_id = \n', "not valid TOML"),
])
def test_config_errors_say_what_and_where(tmp_path, text, match):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config", str(tmp_path / "none.toml")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr


def test_agent_imports_where_importing_torch_raises():
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed on edge boxes')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import agent.cli, agent.daemon, agent.config, agent.deployer, agent.recompress_job, agent.drift_reporter\n"
        "import agent.status, toco_core.recompress, toco_core.model_bundle\n"
        "from agent.cli import app\n"
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_daemon_entry_imports_no_onnx_cryptography_typer_rich_or_torch():
    """What ``toco-agent run`` execs into stays lean: those load only in short-lived children."""
    code = ("import sys, agent.run\n"
            "heavy = {'onnx', 'cryptography', 'typer', 'rich', 'torch'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_run_reports_a_bad_config_in_one_line_before_becoming_the_daemon(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "a"\npublic_key = "/nonexistent.pem"\nbogus = 1\n')
    out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unknown key 'bogus'" in out.stderr


def test_env_sections_as_json_and_unknown_variables_are_errors(tmp_path, monkeypatch):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "a"\npublic_key = "/k"\n[drift]\nwindow_max_samples = 64\n')
    monkeypatch.setenv("TOCO_AGENT_FAULT_PAUSE", '{"activating": 2}')
    monkeypatch.setenv("TOCO_AGENT_DEVICE_ID", "from-env")
    cfg = load_config(path, device_id="from-option")
    assert (cfg.fault_pause, cfg.device_id, cfg.drift.window_max_samples) == ({"activating": 2.0}, "from-env", 64)
    monkeypatch.setenv("TOCO_AGENT_FAULT_PAUSE", "{not json")
    with pytest.raises(ConfigError, match="TOCO_AGENT_FAULT_PAUSE is not valid JSON"):
        load_config(path)
    monkeypatch.delenv("TOCO_AGENT_FAULT_PAUSE")
    monkeypatch.setenv("TOCO_AGENT_DRIFT__WINDOW_MAXX", "3")
    with pytest.raises(ConfigError, match="unknown key 'drift.window_maxx'"):
        load_config(path)
