"""deploy/install-agent.sh in a temp prefix: a real venv with only the agent extra, no torch."""

from __future__ import annotations

import stat
import subprocess

from .conftest import DEPLOY, Installed, public_key_pem


def credentials_env(inst: Installed) -> dict[str, str]:
    """The variables of agent.credentials, read the way systemd's EnvironmentFile does for this format."""
    env = {}
    for line in (inst.etc / "agent.credentials").read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k] = v.strip("'")
    return env


def test_venv_has_the_agent_and_no_torch(installed) -> None:
    assert "torch absent" in installed.first.stdout
    torch = installed.python("import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    imported = installed.python("import sys, agent.run, agent.cli, onnxruntime; "
                                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', "
                                "'sqlalchemy', 'fleet_server')))")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
    where = installed.python("import agent; print(agent.__file__)")
    assert where.stdout.startswith(str(installed.prefix)), "the agent must come from the venv, not the checkout"
    helped = subprocess.run([str(installed.prefix / "bin" / "toco-agent"), "--help"], capture_output=True, text=True,
                            cwd=installed.root, timeout=60)
    assert helped.returncode == 0 and "run" in helped.stdout and "rollback" in helped.stdout


def test_config_and_credentials_are_what_the_agent_reads(installed) -> None:
    toml = (installed.etc / "agent.toml").read_text()
    assert "s3cret-pw" not in toml, "the password belongs in agent.credentials only"
    assert stat.S_IMODE((installed.etc / "agent.credentials").stat().st_mode) == 0o600
    assert stat.S_IMODE((installed.etc / "agent.toml").stat().st_mode) == 0o640
    assert (installed.etc / "fleet-public.pem").read_bytes() == installed.key.read_bytes()
    assert stat.S_IMODE(installed.state.stat().st_mode) == 0o750
    loaded = installed.python(
        "import sys; from agent.config import load_config; c = load_config(sys.argv[1] if len(sys.argv) > 1 else "
        f"'{installed.etc / 'agent.toml'}'); print(c.device_id, c.fleet, c.broker_url, c.username, c.password, "
        "c.public_key, c.state_dir, c.memory_cap, c.fidelity_budget)", env=credentials_env(installed))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["cam-07", "plant1", "mqtt://127.0.0.1:1883", "cam-07", "s3cret-pw",
                                     str(installed.etc / "fleet-public.pem"), str(installed.state),
                                     str(64 * 10**6), "0.01"]


def test_rendered_unit_points_into_the_prefix(installed) -> None:
    unit = (installed.prefix / "share" / "toco-agent" / "toco-agent.service").read_text()
    assert f"ExecStart={installed.prefix}/bin/toco-agent run --config {installed.etc}/agent.toml" in unit
    assert f"EnvironmentFile=-{installed.etc}/agent.credentials" in unit
    assert f"ReadWritePaths={installed.state}" in unit
    assert "/opt/toco-agent" not in unit and "/etc/toco/" not in unit and "/var/lib/toco-agent" not in unit
    assert "StateDirectory=" not in unit  # a state dir outside /var/lib is made by the script, not systemd


def test_second_run_changes_nothing(installed) -> None:
    before = {p.name: p.read_bytes() for p in installed.etc.iterdir()}
    again = installed.run(password_file=None)  # no password given: the stored one stays
    assert again.returncode == 0, again.stderr
    assert "reusing venv" in again.stdout and "installed already" in again.stdout
    assert "config" in again.stdout and "unchanged" in again.stdout
    assert "kept the existing credentials" in again.stdout
    assert {p.name: p.read_bytes() for p in installed.etc.iterdir()} == before
    assert not (installed.etc / "agent.toml.bak").exists()


def test_a_config_the_agent_refuses_leaves_the_old_one(installed) -> None:
    before = (installed.etc / "agent.toml").read_bytes()
    bad = installed.run(memory_cap="lots")
    assert bad.returncode == 1
    assert "the agent refuses the config" in bad.stderr and "memory_cap" in bad.stderr
    assert (installed.etc / "agent.toml").read_bytes() == before
    assert not list(installed.etc.glob(".agent.toml.*")), "a temp config was left behind"


def test_bad_arguments_fail_before_touching_anything(tmp_path) -> None:
    inst = Installed.__new__(Installed)  # argument checks only: no install
    inst.root, inst.prefix, inst.etc, inst.state = tmp_path, tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
    inst.key, inst.password_file = public_key_pem(tmp_path / "key.pem"), tmp_path / "pw"
    inst.password_file.write_text("pw\n")
    (tmp_path / "bad.pem").write_text("not a key\n")
    cases: dict[str, dict[str, str | None]] = {
        "--device-id is required": dict(device_id=None),
        "device id 'cam/07' is not usable": dict(device_id="cam/07"),
        "must look like mqtt://host[:port]": dict(broker_url="http://broker:1883"),
        "is not a PEM public key": dict(public_key=str(tmp_path / "bad.pem")),
        "cannot read the public key": dict(public_key=str(tmp_path / "missing.pem")),
        "paths must be absolute": dict(prefix="relative/opt"),
    }
    for message, changes in cases.items():
        r = inst.run(**changes)
        assert r.returncode != 0 and message in r.stderr, f"{changes}: {r.stderr}"
    r = subprocess.run([a for a in inst.args() if a != "--no-systemd"], capture_output=True, text=True)
    assert r.returncode != 0 and "--no-user needs --no-systemd" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pem", "key.pem", "pw"], "a refused run created files"
    assert (DEPLOY / "install-agent.sh").stat().st_mode & stat.S_IXUSR
