"""Fidelity of a model against the base model's own outputs; no labels needed.

Outputs are ``[N, C]`` or ``[N, C, *positions]`` (class axis 1, ONNX layout); every
position is a distribution over C classes. Per sample, disagreement is the share of
positions whose top-1 differs from the base, and KL is averaged over positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

OutputKind = Literal["logits", "probs", "logprobs"]


def as_log_probs(out: np.ndarray, kind: OutputKind = "logits") -> np.ndarray:
    """Turn a model output into log-probabilities shaped ``[N, P, C]`` (P positions).

    log p = z - logsumexp(z) for logits; log(max(p, 1e-12)) for probabilities.
    """
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim > 2:
        out = np.moveaxis(out, 1, -1).reshape(out.shape[0], -1, out.shape[1])
    else:
        out = out[:, None, :]
    if kind == "probs":
        result: np.ndarray = np.log(np.clip(out, 1e-12, None))
        return result
    if kind == "logprobs":
        return out
    z = out - out.max(axis=-1, keepdims=True)
    result = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return result


@dataclass(frozen=True)
class Fidelity:
    """Agreement with the base (top-1), mean KL(p_base || p_model), optional accuracy."""

    n: int
    agreement: float
    kl: float
    accuracy: float | None = None
    base_accuracy: float | None = None

    @property
    def disagreement(self) -> float:
        """1 - agreement."""
        return 1.0 - self.agreement

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports."""
        d = asdict(self)
        d["disagreement"] = self.disagreement
        return d


def per_sample_disagreement(base_lp: np.ndarray, cand_lp: np.ndarray) -> np.ndarray:
    """Share of positions per sample where top-1 differs; inputs ``[N, P, C]``; returns ``[N]``."""
    result: np.ndarray = (base_lp.argmax(-1) != cand_lp.argmax(-1)).mean(axis=1)
    return result


def per_sample_kl(base_lp: np.ndarray, cand_lp: np.ndarray) -> np.ndarray:
    """KL(p_base || p_cand) = sum_c p_b (log p_b - log p_c), mean over positions; returns ``[N]``."""
    result: np.ndarray = (np.exp(base_lp) * (base_lp - cand_lp)).sum(-1).mean(axis=1)
    return result


def compare_outputs(
    base_out: np.ndarray,
    cand_out: np.ndarray,
    labels: np.ndarray | None = None,
    kind: OutputKind = "logits",
) -> Fidelity:
    """Fidelity of ``cand_out`` against ``base_out`` (same shape); labels add accuracy.

    Raises ValueError when the shapes differ.
    """
    if base_out.shape != cand_out.shape:
        raise ValueError(f"output shapes differ: base {base_out.shape} vs candidate {cand_out.shape}")
    b, c = as_log_probs(base_out, kind), as_log_probs(cand_out, kind)
    acc = base_acc = None
    if labels is not None:
        lab = np.asarray(labels).reshape(len(labels), -1)
        acc = float((c.argmax(-1) == lab).mean())
        base_acc = float((b.argmax(-1) == lab).mean())
    return Fidelity(
        n=int(base_out.shape[0]),
        agreement=float(1.0 - per_sample_disagreement(b, c).mean()),
        kl=float(max(per_sample_kl(b, c).mean(), 0.0)),
        accuracy=acc,
        base_accuracy=base_acc,
    )
