"""``toco probe`` through typer's runner and as a real process."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from toco_cli.main import app
from toco_core.device import load_profile


def test_probe_writes_json_with_budgets(tmp_path):
    out = tmp_path / "box.json"
    result = CliRunner().invoke(app, ["probe", "--json", str(out), "--no-bench", "--memory", "64MB",
                                      "--storage", "2MB", "--latency", "5ms", "--storage-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "usable memory" in result.output and "64.0 MB" in result.output
    profile = load_profile(out)
    assert profile.memory_budget == 64_000_000 and profile.storage_budget == 2_000_000
    assert abs(profile.latency_budget_s - 0.005) < 1e-12 and profile.benchmark is None


def test_bad_size_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-c", "from toco_cli.main import app; app()", "probe", "--no-bench",
                           "--memory", "12XB"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "12XB" in lines[0] and "unknown unit" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
