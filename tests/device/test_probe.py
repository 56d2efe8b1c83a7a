"""probe_device on this box: real psutil, /proc/cpuinfo and onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
from onnx import TensorProto, helper

from toco_core.device import RuntimeFormat, parse_cpuinfo
from toco_core.errors import DeviceError
from toco_core.probe import _matmul_nbits_model, _model, _runs, probe_device, supported_formats
from toco_core.runtime import make_session


def test_probe_gives_sane_numbers(probed):
    assert 0 < probed.available_memory <= probed.total_memory <= psutil.virtual_memory().total
    assert probed.total_memory > 100 * 2**20
    assert probed.free_storage > 0
    assert 1 <= probed.physical_cores <= probed.logical_cores == os.cpu_count()
    assert probed.ort_version == ort.__version__
    assert "CPUExecutionProvider" in probed.providers
    assert probed.device_id


def test_benchmark_is_short_and_plausible(probed):
    bench = probed.benchmark
    assert bench is not None and bench.seconds < 1.0
    assert 0.05 < bench.fp32_gflops < 1e5  # a 2-core VM does tens to hundreds of GFLOP/s
    assert bench.int8_gops is not None and 0.05 < bench.int8_gops < 1e5


def test_isa_flags_match_cpuinfo(probed):
    text = Path("/proc/cpuinfo").read_text()
    _, flags = parse_cpuinfo(text)
    assert probed.isa == flags
    if "flags" in text and " avx2 " in text:
        assert "avx2" in probed.isa


def test_formats_come_from_the_runtime(probed):
    assert probed.formats == supported_formats()
    assert RuntimeFormat.FP32 in probed.formats
    # onnxruntime >= 1.18 ships MatMulNBits on CPU
    assert RuntimeFormat.MATMUL_NBITS4 in probed.formats and RuntimeFormat.QDQ_INT8 in probed.formats


def test_matmul_nbits_probe_model_computes_the_right_value():
    # every 4-bit code is 1, default zero point 8, scale 0.01, K = 64 ones: y = 64 * (1 - 8) * 0.01
    out = make_session(_matmul_nbits_model(4)).run(None, {"a": np.ones((1, 64), np.float32)})[0]
    np.testing.assert_allclose(out, np.full((1, 8), -4.48, np.float32), rtol=1e-5)


def test_an_unknown_kernel_is_reported_unsupported():
    node = helper.make_node("MatMulNBitsFromTheFuture", ["a"], ["y"], domain="com.microsoft")
    model = _model([node], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [])
    assert _runs(model) is False


def test_no_bench_and_missing_storage_dir(tmp_path):
    profile = probe_device(tmp_path, benchmark=False, device_id="box-7")
    assert profile.benchmark is None and profile.device_id == "box-7"
    with pytest.raises(DeviceError, match="does not exist"):
        probe_device(tmp_path / "missing", benchmark=False)
