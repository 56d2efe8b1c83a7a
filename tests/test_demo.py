"""`toco demo --once`: the story from digits to three device models, as a user runs it."""

import subprocess
import sys


def test_demo_once_runs_the_story_to_the_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "toco_cli", "demo", "--once", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one analysis, three devices" in proc.stdout
    for device in ("handheld", "camera-box", "line-pc"):
        assert (tmp_path / f"{device}.onnx").stat().st_size > 0
    assert (tmp_path / "analysis" / "manifest.json").is_file()
    assert (tmp_path / "analysis.png").read_bytes()[:4] == b"\x89PNG"
