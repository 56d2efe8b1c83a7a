"""Second moments of the inputs each weight multiplies (the A factor of K-FAC), batch by batch.

A weight tensor is read as rows (one per output unit) of columns (the inputs a row
multiplies): Conv weights ``[C_out, C_in/g * k...]`` against the unfolded input patches,
Gemm/MatMul weights ``[N, K]`` against the input rows. For every covered weight

    A = mean_x sum_positions u u^T        (per group for grouped convolutions)

with u the column vector a row sees at one output position. Pruning a set P of a row's
weights moves that row's output by -sum_{j in P} w_j u_j, whose mean square over the data is
w_P^T A w_P: the correlations between inputs decide whether pruned weights add up or cancel.

Not covered (the caller falls back to the diagonal): ConvTranspose, 3-D convolutions, a
weight used by several nodes or as a left operand, rows longer than ``max_columns``.
Shaped like sparsegpt's solver: add_batch, result, free; numbers in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from toco_core.analysis.graph_eval import GraphEvaluator
from toco_core.analysis.graph_eval.node import OpNode, spatial_pads, torch_pad_list
from toco_core.analysis.torch_inputs import to_torch
from toco_core.model_inputs import Batch
from toco_core.runtime import BATCH_BYTES, rows_per_batch

_CHUNK_FLOATS = 16_000_000  # unfolded patches held at once (64 MB)


@dataclass(frozen=True)
class RowLayout:
    """How a weight tensor reads as ``[rows, columns]``: rows = output units, split into groups."""

    transpose: bool
    groups: int

    def rows(self, w: np.ndarray) -> np.ndarray:
        """The ``[R, C]`` view of ``w``: W^T for [K, N] weights, else W reshaped to [C_out, -1]."""
        return w.T if self.transpose else w.reshape(w.shape[0], -1)

    def unrows(self, r: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of ``rows``: an ``[R, C]`` array back to the weight's own shape."""
        return r.T.reshape(shape) if self.transpose else r.reshape(shape)


@dataclass(frozen=True)
class Moments:
    """The layout of one weight and its input moments ``a`` ``[groups, C, C]`` (float64)."""

    layout: RowLayout
    a: np.ndarray


def _conv_patches(node: OpNode, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Unfolded input patches ``[B, C_in * prod(kernel), positions]`` of a 1-D or 2-D Conv."""
    n = w.dim() - 2
    if n not in (1, 2):
        return None
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * n))
    dilations = list(node.attr("dilations", [1] * n))
    x = F.pad(x, torch_pad_list(spatial_pads(node, x.shape[2:], kernel, strides, dilations)))
    if n == 1:  # a 1-D conv is a 2-D conv of height 1
        x, kernel, strides, dilations = x.unsqueeze(2), [1, *kernel], [1, *strides], [1, *dilations]
    return F.unfold(x, tuple(kernel), dilation=tuple(dilations), stride=tuple(strides))


class InputMoments:
    """Accumulates A per covered weight from the inputs its node sees (see the module docstring)."""

    def __init__(self, ev: GraphEvaluator, names: list[str], max_columns: int = 4096) -> None:
        self.ev = ev
        self.names = set(names)
        self.max_columns = max_columns
        self.sums: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, RowLayout] = {}
        self.skipped: set[str] = set()
        self.count = 0
        self._seen: set[str] = set()  # weights met in the current forward pass

    def _use(self, name: str, layout: RowLayout, a: torch.Tensor | None) -> None:
        """Add one node's contribution; a weight met twice in one pass, or uncovered, is skipped."""
        if name in self._seen or a is None or a.shape[-1] > self.max_columns:
            self.skipped.add(name)
        self._seen.add(name)
        if name in self.skipped or a is None:  # a is None: skipped above
            self.sums.pop(name, None)
            return
        self.layouts[name] = layout
        self.sums[name] = self.sums.get(name, 0) + a.double()

    def _tap(self, node: OpNode, args: list[torch.Tensor | None]) -> None:
        weight_at = [i for i, n in enumerate(node.inputs) if n in self.names]
        if not weight_at:
            return
        if node.op_type not in ("Conv", "Gemm", "MatMul") or weight_at != [1]:
            for i in weight_at:
                self._use(node.inputs[i], RowLayout(False, 1), None)
            return
        x, w, name = args[0], args[1], node.inputs[1]
        assert x is not None and w is not None, "Conv, Gemm and MatMul always have inputs 0 and 1"
        if node.op_type == "Conv":
            self._use(name, RowLayout(False, node.attr("group", 1)), self._conv_moments(node, x, w))
        elif node.op_type == "Gemm":
            u = x.transpose(0, 1) if node.attr("transA", 0) else x  # [M, K]
            self._use(name, RowLayout(not node.attr("transB", 0), 1), (u.T @ u)[None])
        else:
            ok = w.dim() == 2 and x.dim() >= 2
            rows = x.reshape(-1, x.shape[-1]) if ok else None
            self._use(name, RowLayout(True, 1), None if rows is None else (rows.T @ rows)[None])

    def _conv_moments(self, node: OpNode, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        groups = node.attr("group", 1)
        cols = w.shape[1] * int(np.prod(w.shape[2:]))
        if cols > self.max_columns:
            return None
        total = None
        per_sample = max(1, _CHUNK_FLOATS // max(1, x[0].numel() * int(np.prod(w.shape[2:]))))
        for i in range(0, x.shape[0], per_sample):
            u = _conv_patches(node, x[i : i + per_sample], w)
            if u is None:
                return None
            u = u.reshape(u.shape[0], groups, cols, u.shape[-1])  # [B, g, C, L]
            a = torch.einsum("bgcl,bgdl->gcd", u, u)
            total = a if total is None else total + a
        return total

    def add_batch(self, x: Batch, chunk: int | None = None) -> None:
        """Run the model on ``x`` (numpy in the model's input layout, or a ModelInputs) and add the
        input moments, ``chunk`` samples per forward pass (default: up to 32, about 4 MiB of input:
        every activation of a chunk is alive at once, 32 RGB 224x224 images held 940 MiB)."""
        chunk = chunk or rows_per_batch(x, limit=32, batch_bytes=BATCH_BYTES // 4)
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                self._seen = set()
                self.ev(to_torch(x[i : i + chunk]), tap=self._tap)
        self.count += len(x)

    def result(self) -> dict[str, Moments]:
        """A = the mean over samples, per covered weight. Raises ValueError before any batch."""
        if self.count == 0:
            raise ValueError("no samples added to the input moments")
        return {k: Moments(self.layouts[k], (v / self.count).numpy()) for k, v in self.sums.items()}

    def free(self) -> None:
        """Drop the accumulated sums."""
        self.sums = {}
