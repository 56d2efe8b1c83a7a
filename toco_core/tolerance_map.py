"""ToleranceMap: the per-weight tolerances a device compresses with, and their compact file form.

Two maps per weight tensor, keyed by ONNX name:

- ``quant``: tau_hat of the closed form (tau at eps = 1); stored log-quantized to uint8
  (log2 tau on 255 levels per tensor, code 0 = exactly 0), relative error <= step/2 octaves.
- ``prune_rank``: r_i in (0, 1], the share of all weights pruned before weight i (from the
  iterated analysis rounds). Pruning at scale s zeroes w_i where r_i <= s, so the pruning
  scale *is* the sparsity. Stored as uint16. As a tolerance: tau_prune_i = |w_i| / r_i.

The file is safetensors (no pickle); per-tensor ranges go in its metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from toco_core.errors import AnalysisError

_U16 = 65535


@dataclass(frozen=True)
class ToleranceMap:
    """tau_hat per weight for quantization and the prune rank per weight, keyed by ONNX name."""

    quant: dict[str, np.ndarray]
    prune_rank: dict[str, np.ndarray]

    def summary(self) -> list[dict[str, Any]]:
        """Per-tensor summary: size, tolerance quantiles (quant), median prune rank."""
        rows = []
        for k, t in self.quant.items():
            q = np.quantile(t, [0.1, 0.5, 0.9])
            rows.append({"name": k, "weights": int(t.size), "tau_p10": float(q[0]), "tau_median": float(q[1]),
                         "tau_p90": float(q[2]), "prune_rank_median": float(np.median(self.prune_rank[k]))})
        return rows


def encode_log(tau: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint8 codes of log2 tau: code = 1 + round((log2 tau - lo) / step); 0 encodes tau = 0."""
    pos = tau > 0
    if not pos.any():
        return np.zeros(tau.shape, np.uint8), 0.0, 1.0
    lt = np.log2(tau[pos].astype(np.float64))
    lo, hi = float(lt.min()), float(lt.max())
    step = max((hi - lo) / 254.0, 1e-9)
    codes = np.zeros(tau.shape, np.uint8)
    codes[pos] = (1 + np.round((lt - lo) / step)).astype(np.uint8)
    return codes, lo, step


def decode_log(codes: np.ndarray, lo: float, step: float) -> np.ndarray:
    """Inverse of encode_log (to within half a step in log2)."""
    out = np.exp2(lo + (codes.astype(np.float64) - 1) * step)
    return np.where(codes == 0, 0.0, out).astype(np.float32)


def as_stored(tmap: ToleranceMap) -> ToleranceMap:
    """The map exactly as a device will read it back from the file (log/uint16 rounding applied).

    Calibration must measure what devices will compress with, not the unrounded analysis values.
    """
    quant = {k: decode_log(*encode_log(t)) for k, t in tmap.quant.items()}
    rank = {k: (np.round(np.clip(r, 0, 1) * _U16).astype(np.uint16).astype(np.float32) / _U16)
            for k, r in tmap.prune_rank.items()}
    return ToleranceMap(quant=quant, prune_rank=rank)


def save_tolerance_map(tmap: ToleranceMap, path: Path) -> str:
    """Write the map to ``path`` (safetensors); returns the SHA-256 of the file."""
    tensors, ranges = {}, {}
    for k, t in tmap.quant.items():
        codes, lo, step = encode_log(t)
        tensors[f"quant/{k}"] = codes
        ranges[k] = [lo, step]
        tensors[f"prune_rank/{k}"] = np.round(np.clip(tmap.prune_rank[k], 0, 1) * _U16).astype(np.uint16)
    save_file(tensors, str(path), metadata={"format": "toco-tolerance-v1", "log_ranges": json.dumps(ranges)})
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tolerance_map(path: Path) -> ToleranceMap:
    """Read a map written by save_tolerance_map. Raises AnalysisError if missing or malformed."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        raw = load_file(str(path))
        ranges = json.loads(meta["log_ranges"])
    except FileNotFoundError:
        raise AnalysisError(f"tolerance map {path} does not exist", "run `toco analyze` first") from None
    except Exception as exc:
        raise AnalysisError(f"tolerance map {path} is unreadable: {exc}", "re-run the analysis") from exc
    if meta.get("format") != "toco-tolerance-v1":
        raise AnalysisError(f"{path} is not a TOCO tolerance map (format {meta.get('format')!r})")
    quant, rank = {}, {}
    for k, (lo, step) in ranges.items():
        if f"quant/{k}" not in raw or f"prune_rank/{k}" not in raw:
            raise AnalysisError(f"tolerance map {path} lacks tensor {k!r}", "re-run the analysis")
        quant[k] = decode_log(raw[f"quant/{k}"], lo, step)
        rank[k] = raw[f"prune_rank/{k}"].astype(np.float32) / _U16
    return ToleranceMap(quant=quant, prune_rank=rank)
