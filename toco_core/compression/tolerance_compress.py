"""A compressed weight (codes, steps and float values) and the size statistics of a set of them.

The weights themselves come from the nested quantiser (toco_core.compression.nested and
toco_core.plan_table.plan_codes); this module only describes and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toco_core.compression.entropy import estimate_bits
from toco_core.compression.mixed_precision import channel_bits, code_entropy_bits


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


def summary(tensors: dict[str, CompressedTensor]) -> dict[str, float]:
    """Overall sparsity, mean fixed-width bits of non-zero channels, zero-order entropy bits per weight
    and the storage coder's bits per weight (toco_core.compression.entropy.estimate_bits: its
    mask and per-(min, max) value statistics make it 10-20% smaller than the zero-order entropy)."""
    n = sum(t.values.size for t in tensors.values())
    zeros = sum(int((t.values == 0).sum()) for t in tensors.values())
    ent = sum(t.entropy_bits * t.values.size for t in tensors.values()) / n
    fixed = [
        float(np.mean(channel_bits(t.codes, t.out_axis))) * t.values.size if t.codes is not None
        else 32.0 * t.values.size
        for t in tensors.values()
    ]
    coded = sum(t.values.size * 32.0 if t.codes is None else
                estimate_bits(np.moveaxis(t.codes, t.out_axis, 0).reshape(t.codes.shape[t.out_axis], -1))
                for t in tensors.values()) / n
    return {"sparsity": zeros / n, "fixed_bits": sum(fixed) / n, "entropy_bits": ent, "coded_bits": coded, "weights": n}
