"""Probe the box this runs on: memory, storage, CPU, onnxruntime formats and a GEMM benchmark.

The I/O edge of toco_core.device: psutil, /proc/cpuinfo, cgroup limits, onnxruntime. The
benchmark graphs are built in memory (tiny MatMul / MatMulInteger models) and take well
under a second together.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from onnx import TensorProto, helper, numpy_helper

from toco_core.device import Benchmark, DeviceProfile, RuntimeFormat, parse_cpuinfo
from toco_core.errors import DeviceError, ModelError
from toco_core.runtime import make_session

# onnxruntime's pybind errors (Fail, NotImplemented, InvalidGraph...) share no base but Exception.
_ORT_ERRORS = (ModelError, RuntimeError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail,
               ort.capi.onnxruntime_pybind11_state.NotImplemented,
               ort.capi.onnxruntime_pybind11_state.InvalidArgument,
               ort.capi.onnxruntime_pybind11_state.InvalidGraph,
               ort.capi.onnxruntime_pybind11_state.RuntimeException)

_OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=_OPSET, ir_version=8)


def _matmul_model(n: int) -> onnx.ModelProto:
    b = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                  [numpy_helper.from_array(b, "b")])


def _matmul_integer_model(n: int) -> onnx.ModelProto:
    b = np.random.default_rng(0).integers(-127, 128, (n, n)).astype(np.int8)
    return _model([helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                  [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
                  [numpy_helper.from_array(b, "b")])


def _qdq_model() -> onnx.ModelProto:
    w = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)


def _matmul_nbits_model(bits: int, k: int = 64, n: int = 8, block: int = 32) -> onnx.ModelProto:
    blocks = k // block
    packed = np.full((n, blocks, block * bits // 8), 0x11, dtype=np.uint8)
    scales = np.full(n * blocks, 0.01, dtype=np.float32)
    node = helper.make_node("MatMulNBits", ["a", "b", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block)
    return _model([node], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                  [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "scales")])


def _runs(model: onnx.ModelProto) -> bool:
    """True when onnxruntime loads the model and one run gives finite outputs."""
    try:
        session = make_session(model, threads=1)
        feeds = {}
        for inp in session.get_inputs():
            dtype = np.float32 if inp.type == "tensor(float)" else np.uint8
            feeds[inp.name] = np.ones(inp.shape, dtype=dtype)
        return all(np.isfinite(out).all() for out in session.run(None, feeds))
    except _ORT_ERRORS:
        return False


def supported_formats() -> list[RuntimeFormat]:
    """The RuntimeFormats whose kernels this onnxruntime loads and runs."""
    checks: dict[RuntimeFormat, Callable[[], bool]] = {
        RuntimeFormat.FP32: lambda: True,
        RuntimeFormat.QDQ_INT8: lambda: _runs(_qdq_model()) and _runs(_matmul_integer_model(8)),
        RuntimeFormat.MATMUL_NBITS4: lambda: _runs(_matmul_nbits_model(4)),
        RuntimeFormat.MATMUL_NBITS8: lambda: _runs(_matmul_nbits_model(8)),
    }
    return [fmt for fmt, check in checks.items() if check()]


def _best_time(session: ort.InferenceSession, feeds: dict[str, np.ndarray], budget_s: float) -> float:
    session.run(None, feeds)  # warm-up: pre-packing and arena allocation
    best, start = float("inf"), time.perf_counter()
    for _ in range(50):
        t = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def run_benchmark(n: int = 256, budget_s: float = 0.15) -> Benchmark:
    """Float and int8 n x n GEMMs through onnxruntime; rate = 2 n^3 / best time.

    Each GEMM is repeated for at most ``budget_s`` seconds. Raises DeviceError when even
    the float GEMM cannot run.
    """
    start = time.perf_counter()
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    try:
        fp32 = _best_time(make_session(_matmul_model(n)), {"a": a}, budget_s)
    except _ORT_ERRORS as exc:
        raise DeviceError(f"the float GEMM benchmark does not run in onnxruntime: {exc}",
                          "check the onnxruntime install or use --no-bench") from None
    try:
        a8 = np.random.default_rng(2).integers(0, 256, (n, n)).astype(np.uint8)
        int8 = _best_time(make_session(_matmul_integer_model(n)), {"a": a8}, budget_s)
        int8_gops = 2 * n**3 / int8 / 1e9
    except _ORT_ERRORS:
        int8_gops = None
    return Benchmark(gemm_size=n, fp32_gflops=2 * n**3 / fp32 / 1e9, int8_gops=int8_gops,
                     seconds=time.perf_counter() - start)


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, current usage) of the cgroup v2 this process runs in, None where not limited."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None, None
    return (None if limit == "max" else int(limit)), current


def memory_facts() -> tuple[int, int]:
    """(total, available) memory in bytes; a container's cgroup limit lowers both."""
    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit, current = _cgroup_memory()
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (current or 0)))
    return total, available


def cpu_facts() -> tuple[str, list[str]]:
    """CPU model and ISA flags from /proc/cpuinfo; platform.processor() where it is missing."""
    try:
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        model, flags = "", []
    return model or platform.processor() or platform.machine(), flags


def free_storage(storage_dir: str | Path) -> int:
    """Free bytes on the file system of ``storage_dir``. Raises DeviceError if it does not exist."""
    path = Path(storage_dir)
    if not path.is_dir():
        raise DeviceError(f"storage directory {path} does not exist", "create it or pass another --storage-dir")
    return int(psutil.disk_usage(str(path)).free)


def probe_device(storage_dir: str | Path = ".", benchmark: bool = True, device_id: str | None = None) -> DeviceProfile:
    """Probe this box into a DeviceProfile (no budgets set).

    Takes the directory where models will be stored, whether to run the GEMM benchmark
    (about 0.3 s) and an optional id (default: the host name). Raises DeviceError when the
    storage directory is missing or the runtime cannot run a float GEMM.
    """
    total, available = memory_facts()
    model, flags = cpu_facts()
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return DeviceProfile(
        device_id=device_id or socket.gethostname(),
        total_memory=total,
        available_memory=available,
        free_storage=free_storage(storage_dir),
        physical_cores=min(physical, logical),
        logical_cores=logical,
        cpu_model=model,
        isa=flags,
        ort_version=ort.__version__,
        providers=list(ort.get_available_providers()),
        benchmark=run_benchmark() if benchmark else None,
        formats=supported_formats(),
    )
