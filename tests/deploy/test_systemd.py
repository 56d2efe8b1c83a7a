"""deploy/systemd/toco-agent.service: systemd's own checks, and the hardening the issue asks for."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import DEPLOY

UNIT = DEPLOY / "systemd" / "toco-agent.service"
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed on this machine "
                                                           "(Debian package systemd); the unit cannot be verified here")


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_has_the_hardening_and_restart_policy() -> None:
    d = directives(UNIT.read_text())
    want = {"User": "toco", "Restart": "always", "StateDirectory": "toco-agent", "ProtectSystem": "strict",
            "ProtectHome": "yes", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
            "ReadWritePaths": "/var/lib/toco-agent",
            "OOMPolicy": "continue", "CapabilityBoundingSet": "", "KillSignal": "SIGTERM",
            "StartLimitIntervalSec": "0"}
    for key, value in want.items():
        assert d.get(key) == [value], f"{key}: {d.get(key)}"
    assert d["ExecStart"] == ["/opt/toco-agent/bin/toco-agent run --config /etc/toco/agent.toml"]
    assert d["MemoryMax"][0].endswith(("M", "G"))


@needs_analyze
def test_rendered_unit_passes_systemd_analyze_verify(installed, tmp_path) -> None:
    unit = installed.prefix / "share" / "toco-agent" / "toco-agent.service"
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "toco-agent.service" not in r.stderr, f"systemd warns about the unit: {r.stderr}"


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path) -> None:
    """The check above can fail: the shipped template names /opt/toco-agent, which is absent here."""
    if shutil.which("/opt/toco-agent/bin/toco-agent") is not None:
        pytest.skip("an agent is installed in /opt/toco-agent on this machine")
    r = subprocess.run([ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "/opt/toco-agent/bin/toco-agent" in r.stderr


@needs_analyze
def test_security_exposure_is_low(tmp_path) -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=20", str(UNIT)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, f"exposure above 2.0:\n{r.stdout[-600:]}"
    assert "Overall exposure level for toco-agent.service" in r.stdout
