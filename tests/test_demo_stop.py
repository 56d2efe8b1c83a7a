"""The demo's clean-up is bounded: a part that hangs in its stop cannot hang the user's terminal or CI."""

import subprocess
import sys
import textwrap


def test_a_clean_up_past_its_bound_leaves_with_one_line_and_the_threads_stacks(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from toco_cli.demo import stop_within
        with stop_within(Path({str(tmp_path)!r}), 1.0):
            time.sleep(60)  # a stop that never returns
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stopping the agents and the server took over 1 s" in lines[0], proc.stderr
    dump = (tmp_path / "stop-overdue.txt").read_text()
    assert 'File "<string>", line 6' in dump, dump  # the main thread, at the sleep


def test_a_clean_up_within_its_bound_leaves_normally(tmp_path):
    code = f"from pathlib import Path\nfrom toco_cli.demo import stop_within\n" \
           f"with stop_within(Path({str(tmp_path)!r}), 5.0):\n    pass\nprint('done')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "done" and proc.stderr == ""
    assert not (tmp_path / "stop-overdue.txt").exists()
