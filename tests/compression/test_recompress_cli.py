"""`toco recompress` and `toco evaluate`, run as a user runs them (subprocess) on the real demo CNN."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from toco_core.analysis_result import save_result
from toco_core.onnx_model import load_model
from toco_core.runtime import run_model

TOCO = [sys.executable, "-m", "toco_cli"]


def toco(*args, timeout=300):
    return subprocess.run([*TOCO, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})  # wide enough for the tables' headers


@pytest.fixture(scope="module")
def analysis_dir(lenet5_analysis, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "lenet5"
    save_result(lenet5_analysis, out)
    return out


def test_recompress_writes_model_storage_form_and_report_within_the_limit(lenet5_path, analysis_dir, digits,
                                                                        tmp_path):
    out = tmp_path / "small.onnx"
    proc = toco("recompress", lenet5_path, "--analysis", analysis_dir, "--storage", "40KB", "--budget", "1%", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "per-layer decisions" in proc.stdout and "bias shift" in proc.stdout and "self-test passed" in proc.stdout
    assert "p50 latency (batch 1, measured)" in proc.stdout  # latency is never predicted: the report says so
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["storage_bytes"] == out.with_suffix(".toco").stat().st_size <= 40_000
    assert report["self_test"]["passed"] and len(report["layers"]) == 5
    # the runnable model really runs and agrees with the base on unseen digits
    unseen = digits.x_heldout[:300]
    base, small = run_model(load_model(lenet5_path), unseen), run_model(load_model(out), unseen)
    assert (base.argmax(1) != small.argmax(1)).mean() <= 0.03

    pool = tmp_path / "unseen.npz"
    np.savez(pool, x=unseen, y=digits.y_heldout[:300])
    for model in (out, out.with_suffix(".toco")):  # the storage form decodes to the same model
        ev = toco("evaluate", model, lenet5_path, "--pool", pool)
        assert ev.returncode == 0, ev.stderr
        assert "agreement" in ev.stdout


def test_limits_no_plan_can_meet_exit_non_zero_with_the_numbers(lenet5_path, analysis_dir, tmp_path):
    proc = toco("recompress", lenet5_path, "--analysis", analysis_dir, "--storage", "1KB", "-o", tmp_path / "x.onnx")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # the analysis built its points' storage forms: the size named is the smallest one a box would store
    assert "the smallest plan needs storage" in lines[0] and "vs 1.0 KB allowed" in lines[0], lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_a_latency_no_plan_can_meet_says_so_and_what_to_relax(lenet5_path, analysis_dir, tmp_path):
    """Every try fails the latency check: the one line names it per try, and the hint is that limit's."""
    proc = toco("recompress", lenet5_path, "--analysis", analysis_dir, "--latency", "0.001ms",
                "-o", tmp_path / "x.onnx")
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "passed its checks" in lines[0] and "latency: p50" in lines[0] and "over the limit 0.001 ms" in lines[0]
    # the hint is the latency limit's when every try failed on it (an nbits try may fail fidelity first)
    only_latency = "fidelity:" not in lines[0] and "memory:" not in lines[0] and "storage:" not in lines[0]
    assert lines[0].endswith("(relax the latency limit or run on a faster box)" if only_latency else
                             "(relax the limits, or re-run the analysis with more pool samples)"), lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_the_hint_names_the_check_every_try_failed():
    from toco_core.recompress import _failure_hint

    lat = "prune 50% + quant s=0.126 / fp32: latency: p50 0.03 ms over the limit 0.001 ms"
    fid = "quant s=0.189 / nbits: fidelity: self-test 1.20% > 0.16% + 0.89%"
    mem = "prune 60% + quant s=0.2 / int8: memory: session RSS 21.0 MB (limit 20.5 MB)"
    assert _failure_hint([lat, lat]) == "relax the latency limit or run on a faster box"
    assert _failure_hint([fid]).startswith("re-run the analysis with more pool samples")
    assert _failure_hint([mem]) == "relax the memory limit"
    generic = "relax the limits, or re-run the analysis with more pool samples"
    assert _failure_hint([lat, fid]) == _failure_hint([]) == generic


def test_a_bad_size_is_one_line(lenet5_path, analysis_dir, tmp_path):
    proc = toco("recompress", lenet5_path, "--analysis", analysis_dir, "--storage", "lots", "-o", tmp_path / "x.onnx")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lots" in proc.stderr
