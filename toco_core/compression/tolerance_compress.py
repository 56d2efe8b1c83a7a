"""Tolerance compression of the weights themselves: prune, then per-channel quantize.

This is the weight-level operator every device runs first (numpy only): pruning at scale
s_p (w = 0 where |w| <= s_p tau_prune) followed by mixed precision at scale s_q (per-channel
step from s_q tau_quant). The result keeps integer codes + steps for the storage form and
float weights for running or measuring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toco_core.compression.entropy import estimate_bits
from toco_core.compression.mixed_precision import channel_bits, channel_steps, code_entropy_bits, quantize
from toco_core.compression.pruning import prune_mask
from toco_core.onnx_model import WeightInfo


@dataclass(frozen=True)
class CompressedTensor:
    """One weight after compression: codes * step per channel == values (step None: float)."""

    name: str
    values: np.ndarray
    codes: np.ndarray | None
    steps: np.ndarray | None
    out_axis: int

    @property
    def sparsity(self) -> float:
        """Share of exact zeros."""
        return float((self.values == 0).mean())

    @property
    def entropy_bits(self) -> float:
        """Bits per weight an entropy coder approaches (32 for float)."""
        return 32.0 if self.codes is None else code_entropy_bits(self.codes)


def compress_tensor(
    w: np.ndarray,
    info: WeightInfo,
    prune_tau: np.ndarray | None,
    quant_tau: np.ndarray | None,
    coverage: float = 0.99,
) -> CompressedTensor:
    """Prune where |w| <= prune_tau (if given), then quantize with steps from quant_tau (if given)."""
    values = w.astype(np.float32)
    if prune_tau is not None:
        values = np.where(prune_mask(values, prune_tau), np.float32(0), values)
    if quant_tau is None:
        return CompressedTensor(info.name, values, None, None, info.out_axis)
    steps = channel_steps(values, quant_tau, info.out_axis, coverage)
    codes, deq = quantize(values, steps, info.out_axis)
    return CompressedTensor(info.name, deq, codes, steps, info.out_axis)


def compress_weights(
    weights: dict[str, np.ndarray],
    infos: list[WeightInfo],
    prune_tau_hat: dict[str, np.ndarray] | None,
    quant_tau_hat: dict[str, np.ndarray] | None,
    prune_scale: float = 0.0,
    quant_scale: float = 0.0,
    coverage: float = 0.99,
) -> dict[str, CompressedTensor]:
    """Apply both operators to every compressible weight; a scale of 0 switches one off."""
    out = {}
    for info in infos:
        pt = prune_tau_hat[info.name] * np.float32(prune_scale) if prune_tau_hat is not None and prune_scale > 0 else None
        qt = quant_tau_hat[info.name] * np.float32(quant_scale) if quant_tau_hat is not None and quant_scale > 0 else None
        out[info.name] = compress_tensor(weights[info.name], info, pt, qt, coverage)
    return out


def summary(tensors: dict[str, CompressedTensor]) -> dict[str, float]:
    """Overall sparsity, mean fixed-width bits of non-zero channels, zero-order entropy bits per weight
    and the storage coder's bits per weight (toco_core.compression.entropy.estimate_bits: its
    mask and per-(min, max) value statistics make it 10-20% smaller than the zero-order entropy)."""
    n = sum(t.values.size for t in tensors.values())
    zeros = sum(int((t.values == 0).sum()) for t in tensors.values())
    ent = sum(t.entropy_bits * t.values.size for t in tensors.values()) / n
    fixed = [
        float(np.mean(channel_bits(t.codes, t.out_axis))) * t.values.size if t.codes is not None else 32.0 * t.values.size
        for t in tensors.values()
    ]
    coded = sum(t.values.size * 32.0 if t.codes is None else
                estimate_bits(np.moveaxis(t.codes, t.out_axis, 0).reshape(t.codes.shape[t.out_axis], -1))
                for t in tensors.values()) / n
    return {"sparsity": zeros / n, "fixed_bits": sum(fixed) / n, "entropy_bits": ent, "coded_bits": coded, "weights": n}
