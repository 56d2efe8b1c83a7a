"""Diagonal Fisher of the model's own output distribution, accumulated batch by batch.

    F_i = mean_{x in S} sum_y p(y|x) (d log p(y|x) / d w_i)^2

No labels: y ranges over the model's own prediction. With few classes (and one position)
the expectation over y is exact, through one Jacobian per sample (torch.func.jacrev under
vmap); otherwise y is sampled from p, ``y_samples`` draws per sample and position.
Shaped like sparsegpt's solver: add_batch, result, free; no file or ONNX I/O here.

For the task kinds that are not classifiers (toco_core.task_kind) the output is a Gaussian
mean instead: z = y / sigma (regression, score) or z = y / ||y|| (embedding), and

    F_i = mean_{x in S} sum_k (d z_k(x) / d w_i)^2,

the diagonal of J^T J. Exact through one Jacobian per sample for a narrow output; otherwise
sampled as E_eps[(eps . dz/dw_i)^2] with eps ~ N(0, I), which has the same expectation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.func import grad, jacrev, vmap

from toco_core.analysis.torch_inputs import TorchBatch, rows, to_torch, with_batch_axis
from toco_core.model_inputs import Batch
from toco_core.task_kind import CLASSIFIER, TaskKind, TaskSpec

Forward = Callable[[TorchBatch, dict[str, torch.Tensor]], torch.Tensor]
_FLOATS_PER_CHUNK = 40_000_000
_EXACT_LIMIT = 20_000_000  # bounds the Jacobian memory: chunk * classes * weights floats


def _log_probs(out: torch.Tensor, kind: str) -> torch.Tensor:
    """[1, C, *pos] model output -> [P, C] log-probabilities."""
    out = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2).reshape(-1, out.shape[1])
    if kind == "probs":
        return torch.log(out.clamp_min(1e-12))
    if kind == "logprobs":
        return out
    return torch.log_softmax(out, dim=-1)


def _gaussian_mean(out: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """[B, ...] model output -> [B, D] the Gaussian mean z of the task (y / sigma or y / ||y||)."""
    y = out.reshape(out.shape[0], -1)
    if task.kind is TaskKind.EMBEDDING:
        unit: torch.Tensor = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return unit
    scaled: torch.Tensor = y / task.scale
    return scaled


def _weighted_square_sum(j: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{b,c} p[b, c] * j[b, c, ...]^2 (p = 1 when None) as float64, shaped like one weight.

    ``j`` is overwritten (squared in place). The squares and the sum over one chunk (at most 64
    samples x 64 classes) stay in float32, a relative error near 1e-6 against float64, and only
    the weight-shaped result is widened: widening the [B, C, *shape] Jacobian first cost two
    float64 copies of it and about half of LeNet-5's Fisher time.
    """
    flat = j.reshape(j.shape[0] * j.shape[1], -1)
    weights = torch.ones(flat.shape[0], dtype=j.dtype) if p is None else p.reshape(-1).to(j.dtype)
    # squared in place: the Jacobian is used once, and a copy of a chunk's is up to 160 MB
    return (weights @ flat.square_()).double().reshape(j.shape[2:])


class FisherAccumulator:
    """Accumulates sum_x sum_y p(y|x) g_y(x)^2 (a classifier) or sum_x diag(J^T J) (a Gaussian
    task kind) for the named weights of ``forward``."""

    def __init__(
        self,
        forward: Forward,
        weights: dict[str, torch.Tensor],
        kind: str = "logits",
        max_exact_classes: int = 64,
        y_samples: int = 2,
        seed: int = 0,
        sampled: bool = False,
        task: TaskSpec = CLASSIFIER,
    ) -> None:
        self.forward = forward
        self.task = task
        self.weights = {k: v.detach() for k, v in weights.items()}
        self.kind = kind
        self.max_exact_classes = max_exact_classes
        self.y_samples = y_samples
        self.sampled = sampled  # force sampled y (cheap refreshes, e.g. the pruning rounds)
        self.gen = torch.Generator().manual_seed(seed)
        self.sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self.weights.items()}
        self.count = 0
        self._width = 1
        self._n = sum(v.numel() for v in self.weights.values())

    def _exact(self, x: TorchBatch) -> None:
        def log_p(w: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return _log_probs(self.forward(with_batch_axis(xi), w), self.kind)[0]  # [C]

        with torch.no_grad():
            p = torch.exp(_log_probs(self.forward(x, self.weights), self.kind))  # [B, C]
        jac = vmap(jacrev(log_p), in_dims=(None, 0))(self.weights, x)  # name -> [B, C, *shape]
        for k, j in jac.items():
            self.sums[k] += _weighted_square_sum(j.detach(), p)

    def _sampled(self, x: TorchBatch) -> None:
        with torch.no_grad():
            lp = _log_probs(self.forward(x, self.weights), self.kind)  # [B*P, C]
        positions = lp.shape[0] // rows(x)
        for _ in range(self.y_samples):
            y = torch.multinomial(torch.exp(lp), 1, generator=self.gen).reshape(rows(x), positions)

            def picked(w: dict[str, torch.Tensor], xi: TorchBatch, yi: torch.Tensor) -> torch.Tensor:
                return _log_probs(self.forward(with_batch_axis(xi), w), self.kind).gather(1, yi[:, None]).sum()

            g = vmap(grad(picked), in_dims=(None, 0, 0))(self.weights, x, y)
            for k, gk in g.items():
                self.sums[k] += _weighted_square_sum(gk.detach()[:, None]) / self.y_samples

    def _gaussian_exact(self, x: TorchBatch) -> None:
        def z(w: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return _gaussian_mean(self.forward(with_batch_axis(xi), w), self.task)[0]  # [D]

        jac = vmap(jacrev(z), in_dims=(None, 0))(self.weights, x)  # name -> [B, D, *shape]
        for k, j in jac.items():
            self.sums[k] += _weighted_square_sum(j.detach())

    def _gaussian_sampled(self, x: TorchBatch) -> None:
        for _ in range(self.y_samples):
            eps = torch.randn((rows(x), self._width), generator=self.gen, dtype=torch.float32)

            def projected(w: dict[str, torch.Tensor], xi: TorchBatch, ei: torch.Tensor) -> torch.Tensor:
                return (_gaussian_mean(self.forward(with_batch_axis(xi), w), self.task)[0] * ei).sum()

            g = vmap(grad(projected), in_dims=(None, 0, 0))(self.weights, x, eps)
            for k, gk in g.items():
                self.sums[k] += _weighted_square_sum(gk.detach()[:, None]) / self.y_samples

    def add_batch(self, x: Batch) -> None:
        """Add the Fisher contribution of a batch of inputs (numpy in the model's input layout, or
        a ModelInputs for a model with several inputs)."""
        with torch.no_grad():
            probe = self.forward(to_torch(x[:1]), self.weights)
        if self.task.kind is not TaskKind.CLASSIFIER:
            self._add_gaussian(x, int(probe[0].numel()))
            return
        classes, positions = probe.shape[1], probe[0, 0].numel()
        # The exact expectation costs one backward pass per class; past ~20M Jacobian entries per
        # sample (a 5M-weight CNN with 10 classes) sampling y is 5x cheaper for the same ranking.
        exact = (not self.sampled and positions == 1 and classes <= self.max_exact_classes
                 and self._n * classes <= _EXACT_LIMIT)
        per = self._n * (classes if exact else 1)
        chunk = max(1, min(64, _FLOATS_PER_CHUNK // max(per, 1)))
        for i in range(0, len(x), chunk):
            (self._exact if exact else self._sampled)(to_torch(x[i : i + chunk]))
        self.count += len(x)

    def _add_gaussian(self, x: Batch, width: int) -> None:
        # as for classes: the exact J^T J costs one backward pass per output value
        self._width = width
        exact = not self.sampled and width <= self.max_exact_classes and self._n * width <= _EXACT_LIMIT
        per = self._n * (width if exact else 1)
        chunk = max(1, min(64, _FLOATS_PER_CHUNK // max(per, 1)))
        for i in range(0, len(x), chunk):
            (self._gaussian_exact if exact else self._gaussian_sampled)(to_torch(x[i : i + chunk]))
        self.count += len(x)

    def result(self) -> dict[str, np.ndarray]:
        """The mean Fisher per weight tensor (float64 numpy). Raises ValueError before any batch."""
        if self.count == 0:
            raise ValueError("no samples added to the Fisher accumulator")
        return {k: (v / self.count).numpy() for k, v in self.sums.items()}

    def free(self) -> None:
        """Drop the accumulated sums."""
        self.sums = {}
