"""The `toco analyze` / `toco inspect` commands, run as a user runs them (subprocess)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

TOCO = [sys.executable, "-m", "toco_cli"]


def toco(*args, timeout=300):
    return subprocess.run([*TOCO, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_analyze_then_inspect_with_plot(lenet5_path, pool_file, tmp_path):
    out = tmp_path / "res"
    proc = toco("analyze", lenet5_path, "--pool", pool_file, "-o", out, "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").is_file()
    assert (out / "rounding.parts").is_file()  # compensated rounding, the default
    assert "calibration: prune" in proc.stdout
    assert "rounding: compensated" in proc.stdout
    proc = toco("inspect", out, "--plot", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    assert "per-layer tolerances" in proc.stdout and "7.weight" in proc.stdout
    assert "rounding: compensated" in proc.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_not_an_onnx_file(tmp_path, pool_file):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\x01")
    assert_one_line_error(toco("analyze", bad, "--pool", pool_file, "-o", tmp_path / "o"), "not a readable ONNX model")


def test_model_without_compressible_weights(tmp_path, pool_file):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 28, 28])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert_one_line_error(toco("analyze", path, "--pool", pool_file, "-o", tmp_path / "o"), "no compressible weights")


def test_pool_that_does_not_fit_the_input(tmp_path, lenet5_path):
    pool = tmp_path / "flat.npy"
    np.save(pool, np.zeros((50, 784), np.float32))
    assert_one_line_error(toco("analyze", lenet5_path, "--pool", pool, "-o", tmp_path / "o"),
                          "shaped (784,)", "1x28x28")


def test_empty_pool(tmp_path, lenet5_path):
    pool = tmp_path / "empty.npy"
    np.save(pool, np.zeros((0, 1, 28, 28), np.float32))
    assert_one_line_error(toco("analyze", lenet5_path, "--pool", pool, "-o", tmp_path / "o"), "is empty")


def test_unsupported_op_is_named(tmp_path, pool_file, lenet5):
    model = onnx.ModelProto()
    model.CopyFrom(lenet5)
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("Einsum", ["pre"], [out], name="weird_einsum", equation="ij->ij"))
    path = tmp_path / "einsum.onnx"
    onnx.save(model, path)
    assert_one_line_error(toco("analyze", path, "--pool", pool_file, "-o", tmp_path / "o"), "Einsum", "weird_einsum")


@pytest.mark.parametrize("budget", ["150%", "abc"])
def test_bad_budget(tmp_path, lenet5_path, pool_file, budget):
    assert_one_line_error(toco("analyze", lenet5_path, "--pool", pool_file, "-o", tmp_path / "o", "--budget", budget),
                          "share")


def test_bad_rounding(tmp_path, lenet5_path, pool_file):
    assert_one_line_error(toco("analyze", lenet5_path, "--pool", pool_file, "-o", tmp_path / "o", "--rounding", "up"),
                          "--rounding", "compensated or nearest")


def test_inspect_missing_directory(tmp_path):
    assert_one_line_error(toco("inspect", tmp_path / "nothing"), "not an analysis result")
