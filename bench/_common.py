"""Helpers of the compression benchmark: cached analyses, the onnxruntime and magnitude
baselines, their transfer size through TOCO's own coder, and the per-row measurements.

Every transfer size goes through ``toco_core.compression.storage.encode_model`` (integer codes
per channel, entropy coded), so baselines and TOCO are compared with the same coder.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from toco_core.analysis_result import AnalysisResult, load_result, save_result
from toco_core.compression.pruning import magnitude_thresholds
from toco_core.compression.storage import QuantizedTensor, encode_model
from toco_core.fidelity import compare_outputs
from toco_core.measure import p50_latency, session_memory
from toco_core.onnx_model import compressible_weights, model_bytes, model_hash, read_weights, with_weights
from toco_core.runtime import run_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROFILES = ROOT / "deploy" / "profiles"
# the analysis code whose change invalidates a cached analysis
_ANALYSIS_SOURCES = [*sorted((ROOT / "toco_core" / "analysis").rglob("*.py")),
                     *(ROOT / "toco_core" / f for f in ("tolerance.py", "tolerance_map.py", "calibration.py", "qbc.py",
                                                        "plan_table.py", "compression/nested.py",
                                                        "compression/bias_correction.py",
                                                        "compression/compensated_rounding.py",
                                                        "rounding_parts.py",  # stored encoded
                                                        "compression/qdq_int8.py"))]  # the int8 curve
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on every call


@dataclass
class Row:
    """One line of a benchmark table (sizes in bytes, times in seconds, fidelity on held-out)."""

    name: str
    file_bytes: int | None = None
    transfer_bytes: int | None = None
    rss: int | None = None
    anon_rss: int | None = None  # the anonymous part of rss: the model's own, without onnxruntime's code pages
    p50_s: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    seconds: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        """Plain dict for the JSON output."""
        return asdict(self)


def within_budget(disagreement: float, budget: float) -> bool:
    """disagreement <= budget for shares of a digit count: 10 of 1,000 digits is within 1 %, though
    1 - 0.99 is 0.010000000000000009 in floats (a plan at exactly 1.0 % was counted a miss)."""
    return disagreement <= budget + 1e-9


def _analysis_key(model: onnx.ModelProto, settings_json: str) -> str:
    h = hashlib.sha256(model_hash(model).encode() + settings_json.encode())
    for path in _ANALYSIS_SOURCES:
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def cached_analysis(name: str, model: onnx.ModelProto, pool_x: np.ndarray, pool_y: np.ndarray,
                    settings=None, fresh: bool = False) -> tuple[AnalysisResult, bool]:
    """The analysis of ``model`` on the pool, from bench/results/analysis-<name>/ when its key
    (model hash, settings, analysis sources) still matches, else computed and saved.

    Returns (result, whether it was loaded from the cache).
    """
    from toco_core.analysis.pipeline import analyze  # torch: only imported when needed
    from toco_core.analysis.settings import AnalysisSettings

    settings = settings or AnalysisSettings()
    out = RESULTS / f"analysis-{name}"
    key = _analysis_key(model, settings.model_dump_json())
    key_file = out / "bench-key.txt"
    if not fresh and key_file.is_file() and key_file.read_text().strip() == key:
        return load_result(out), True
    result = analyze(model, pool_x, pool_y, settings, model_name=name)
    save_result(result, out)
    key_file.write_text(key + "\n")
    return result, False


def quantize_dynamic_model(path: Path) -> onnx.ModelProto:
    """onnxruntime quantize_dynamic with int8 weights (its defaults otherwise)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="bench-dyn-") as tmp:
        out = Path(tmp) / "dyn.onnx"
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def codes_of_quantized(base: onnx.ModelProto, quantized: onnx.ModelProto) -> list[QuantizedTensor]:
    """The integer codes onnxruntime's quantizer stored for each compressible weight of ``base``.

    Reads ``<w>_quantized`` (or ``<w>_Transposed_quantized``, transposed back) with its scale and
    zero point: codes = q - zero_point, step = scale per output channel (a per-tensor scale is
    repeated). Weights the quantizer left in float are not listed (they travel as float).
    """
    inits = _initializers(quantized)
    out = []
    for info in compressible_weights(base):
        for stem, flip in ((info.name, False), (f"{info.name}_Transposed", True)):  # noqa: B007 - read after the break
            if f"{stem}_quantized" in inits:
                break
        else:
            continue
        q = inits[f"{stem}_quantized"].astype(np.int32)
        zp = inits[f"{stem}_zero_point"].astype(np.int32)
        scale = inits[f"{stem}_scale"].astype(np.float32)
        if flip:
            q = q.T
        channels = info.shape[info.out_axis]
        if zp.size > 1 or np.any(zp):
            shape = [1] * q.ndim
            shape[info.out_axis] = -1
            q = q - (zp.reshape(shape) if zp.size > 1 else zp)
        steps = np.broadcast_to(scale.ravel(), (channels,)) if scale.size == 1 else scale.ravel()
        out.append(QuantizedTensor(info.name, q, np.ascontiguousarray(steps, dtype=np.float32), info.out_axis))
    return out


def uniform_codes(weights: dict[str, np.ndarray], infos, bits: int) -> list[QuantizedTensor]:
    """Symmetric uniform per-channel quantization: step_c = max|w_c| / (2^(bits-1) - 1)."""
    out = []
    qmax = 2 ** (bits - 1) - 1
    for info in infos:
        w = weights[info.name]
        absmax = np.abs(np.moveaxis(w, info.out_axis, 0).reshape(w.shape[info.out_axis], -1)).max(axis=1)
        steps = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[info.out_axis] = -1
        q = np.clip(np.rint(w / steps.reshape(shape)), -qmax, qmax).astype(np.int32)
        out.append(QuantizedTensor(info.name, q, steps, info.out_axis))
    return out


def dequantized(tensors: list[QuantizedTensor]) -> dict[str, np.ndarray]:
    """{name: codes * step} as float32."""
    out = {}
    for q in tensors:
        shape = [1] * q.codes.ndim
        shape[q.out_axis] = -1
        out[q.name] = (q.codes * q.steps.reshape(shape)).astype(np.float32)
    return out


def magnitude_uniform(base: onnx.ModelProto, target: int, x: np.ndarray, base_out: np.ndarray,
                      bits_range=range(2, 9), grid=np.arange(0.0, 0.9991, 0.001)):  # noqa: B008 - read only
    """Global magnitude pruning + uniform per-channel bits at a transfer size <= ``target``.

    For each bit width, binary-searches the lowest sparsity on ``grid`` whose encoded size fits
    (size falls with sparsity), then keeps the fitting point with the best agreement on x
    (ties: smaller). Returns (model, codes, transfer bytes, label), or None when nothing fits.
    The grid is in steps of 0.1 point: at LeNet-5's 89% one point of sparsity is a tenth of the
    surviving weights, and a 1-point grid left the baseline 3.1% under the size it was given.
    """
    infos = compressible_weights(base)
    weights = read_weights(base, infos)
    best = None
    for bits in bits_range:
        def at(s: float):
            th = magnitude_thresholds(weights, float(s)) if s > 0 else {k: -1.0 for k in weights}
            pruned = {k: np.where(np.abs(w) <= th[k], np.float32(0), w) for k, w in weights.items()}
            codes = uniform_codes(pruned, infos, bits)
            return codes, len(encode_model(base, codes))
        lo, hi = 0, len(grid) - 1
        codes, size = at(grid[hi])
        if size > target:
            continue
        found = (grid[hi], codes, size)
        while lo < hi:  # invariant: grid[hi] fits
            mid = (lo + hi) // 2
            codes, size = at(grid[mid])
            if size <= target:
                hi, found = mid, (grid[mid], codes, size)
            else:
                lo = mid + 1
        s, codes, size = found
        model = with_weights(base, dequantized(codes))
        agree = compare_outputs(base_out, run_model(model, x)).agreement
        if best is None or (agree, -size) > (best[0], -best[3]):
            best = (agree, model, codes, size, f"sparsity {s:.1%}, {bits} bits")
    return None if best is None else best[1:]


def measure(row: Row, model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, base_out: np.ndarray,
            runs: int = 200, rss: bool = True) -> Row:
    """Fill the file size, session RSS (and its anonymous part), p50 at batch 1 and held-out
    agreement/accuracy of a row.

    p50 is the best of three medians: the 2 cores are shared, and a busy neighbour only ever
    makes a run slower, so the minimum is the steadiest estimate of the model's own speed.
    """
    data = model_bytes(model)
    row.file_bytes = len(data)
    mem = session_memory(data, (1, *x.shape[1:])) if rss else None
    row.rss, row.anon_rss = (mem.rss, mem.anon) if mem is not None else (None, None)
    row.p50_s = min(p50_latency(data, x[:1], runs=runs) for _ in range(3))
    fid = compare_outputs(base_out, run_model(data, x), y)
    row.agreement, row.accuracy = fid.agreement, fid.accuracy
    return row
