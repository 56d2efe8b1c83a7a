"""Error-compensated rounding (GPTQ-style): round a weight's codes so the layer's output error,
not each weight's own error, is small.

Rounding every weight to its nearest grid point ignores that the error of one weight can be
cancelled by its neighbours in the same output channel. With X the layer's inputs (im2col rows for
a Conv) and H = X^T X / rows its input Hessian, the output error of channel r is
e_r^T H e_r for the weight error e_r; rounding the input columns one at a time and pushing each
column's error onto the columns not yet rounded through the Cholesky factor U of H^-1
(H^-1 = U^T U, U upper) minimises it greedily (Frantar et al., GPTQ, 2022):

    c_j = rint(w_j / D)            (0 where the weight is pruned)
    w_{j+1:} -= ((w_j - c_j D) / U_jj) U_{j, j+1:}

Steps D and prune masks stay those of the plain point, so only codes change, mostly by one step.
Those code differences are what travels to a box (toco_core.rounding_parts); a box never needs
X or the fp32 weights. Numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from toco_core.compression.entropy import MAX_CODE
from toco_core.compression.graph_edit import attr
from toco_core.compression.storage import QuantizedTensor
from toco_core.model_inputs import Batch, ModelInputs
from toco_core.onnx_model import WeightInfo, with_outputs
from toco_core.runtime import make_session

DAMP = 0.01  # share of H's mean diagonal added to it: keeps H invertible where inputs are dead or collinear
# a channel's codes stay within HEADROOM x its largest plain |code|, as GPTQ stays near its grid: the
# error of pruned weights pushed onto few survivors must not grow codes without bound (LeNet-5's
# finest points passed the coder's 4095 without a limit). bench/compensated_rounding.py on the five
# LeNet-5 variants, unseen flips cut at equal steps: 11-27% at 1, 23-37% at 2, 26-39% unlimited,
# storage +0.0-0.7%, +1.2-1.8%, +1.3-2.2%
HEADROOM = 2.0
# columns rounded before the rest of the weight is updated at once: the update inside a block is
# elementwise, the one after it a matrix product; 64 halved the pass on LeNet-5's shapes against 128
# (8,400 rows x 400 columns: 0.25 -> 0.13 s) and matched it on a 3,072 x 2,304 one, same codes
_BLOCK = 64
MAX_COLUMNS = 8192  # a layer with more inputs keeps plain rounding: its Hessian alone would be 512 MB
_SAMPLES_PER_RUN = 16  # model runs of 16 samples; the Hessians add up batch by batch
# im2col rows in flight per product. The 224x224 demo model's are small (at most 28 MiB a run of 16),
# but a 3x3 conv reading 64 channels at 224x224 has 231 MB of float64 rows per image: 3.7 GB a run
_ROW_BYTES = 64 * 2**20


def _consumers(model: onnx.ModelProto, infos: list[WeightInfo]) -> dict[str, onnx.NodeProto]:
    """Weight name -> the Conv/Gemm/MatMul node reading it as its second input, where the rounding
    applies: 2-D Conv with group 1 and no dilation, Gemm without transA, MatMul on a 2-D weight,
    each with at most MAX_COLUMNS input features."""
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for info in infos:
        node = by_name.get(info.node_name)
        if node is None or len(node.input) < 2 or node.input[1] != info.name \
                or info.size // max(info.shape[info.out_axis], 1) > MAX_COLUMNS:
            continue
        plain_conv = node.op_type == "Conv" and len(info.shape) == 4 and attr(node, "group", 1) == 1 \
            and all(d == 1 for d in attr(node, "dilations", [1]))
        dense = (node.op_type == "Gemm" and not attr(node, "transA", 0)
                 or node.op_type == "MatMul" and len(info.shape) == 2)
        if plain_conv or dense:
            out[info.name] = node
    return out


def _rows(node: onnx.NodeProto, a: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """The layer's input as rows of the weight's columns: im2col for a 2-D Conv, flattened otherwise."""
    if node.op_type != "Conv":
        return a.reshape(-1, a.shape[-1]) if node.op_type == "MatMul" else a.reshape(len(a), -1)
    kh, kw = kernel
    sh, sw = attr(node, "strides", [1, 1])
    top, left, bottom, right = attr(node, "pads", [0, 0, 0, 0])
    padded = np.pad(a, ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    # [N, C, H', W', kh, kw] -> one row per output position, columns (C, kh, kw) as the weight's
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, a.shape[1] * kh * kw)


def _row_slices(node: onnx.NodeProto, a: np.ndarray, kernel: tuple[int, ...]) -> Iterator[np.ndarray]:
    """_rows of ``a`` (float64) a few samples at a time, at most about _ROW_BYTES each."""
    # an upper bound of one sample's im2col bytes (stride 1, padded to the input's size)
    step = max(1, _ROW_BYTES // max(1, a[0].size * int(np.prod(kernel)) * 8))
    for s0 in range(0, len(a), step):
        yield _rows(node, np.asarray(a[s0:s0 + step], np.float64), kernel)


def layer_hessians(model: onnx.ModelProto, infos: list[WeightInfo], x: Batch) -> dict[str, np.ndarray]:
    """H = X^T X / rows (float64) of every weight's layer input on the samples ``x``.

    Takes the fp32 model, its compressible weights and a batch of its inputs (the analysis
    samples). Weights the rounding does not apply to (grouped or dilated Conv, a 1-D or 3-D Conv,
    Gemm with transA, a weight read elsewhere) are left out: they keep plain rounding. Returns
    weight name -> [columns, columns]. Raises ModelError when onnxruntime cannot run the model.
    """
    nodes = _consumers(model, infos)
    if not nodes or not len(x):
        return {}
    shapes = {i.name: i.shape for i in infos}
    inputs = [i.name for i in model.graph.input]
    wanted = sorted({n.input[0] for n in nodes.values()} - set(inputs))
    session = make_session(with_outputs(model, wanted)) if wanted else None
    sums: dict[str, np.ndarray] = {}
    rows_seen: dict[str, int] = dict.fromkeys(nodes, 0)
    for start in range(0, len(x), _SAMPLES_PER_RUN):
        chunk = x[start:start + _SAMPLES_PER_RUN]
        feed = dict(chunk.arrays) if isinstance(chunk, ModelInputs) else {inputs[0]: np.asarray(chunk)}
        acts = dict(feed)
        if session is not None:
            names = [o.name for o in session.get_outputs()]
            got = dict(zip(names, session.run(names, feed), strict=True))
            acts.update({k: got[k] for k in wanted})
        for w, node in nodes.items():
            for rows in _row_slices(node, acts[node.input[0]], tuple(shapes[w][2:])):
                part = rows.T @ rows
                sums[w] = part if w not in sums else sums[w] + part
                rows_seen[w] += len(rows)
    return {w: h / max(rows_seen[w], 1) for w, h in sums.items()}


def inverse_factor(h: np.ndarray) -> np.ndarray:
    """U, upper triangular with H^-1 = U^T U, of a layer's damped input Hessian.

    Dead inputs (H_jj = 0) get H_jj = 1, then DAMP times the mean diagonal is added to every H_jj.
    Takes and returns float64 [columns, columns]; computed once per layer, read by every point.
    Raises numpy.linalg.LinAlgError for a Hessian that is not symmetric positive semi-definite.
    """
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * float(np.mean(np.diag(h))) * np.eye(len(h))
    factor: np.ndarray = np.linalg.cholesky(np.linalg.inv(h)).T
    return factor


def compensated_codes(w: np.ndarray, plain: QuantizedTensor, keep: np.ndarray, u: np.ndarray) -> QuantizedTensor:
    """GPTQ rounding of weight ``w`` at ``plain``'s per-channel steps, zero where ``keep`` is False.

    Takes the fp32 weight, its plain codes (steps, out_axis), the mask of weights kept at the
    point's prune level (w's shape) and the factor U of the layer's inverse input Hessian
    (inverse_factor of layer_hessians: columns = the weight's input features in row-major order).
    Codes stay within HEADROOM x each channel's largest plain |code|. Returns a QuantizedTensor with
    the same steps and name. Raises ValueError when the shapes do not fit each other.
    """
    return compensated_many(w, [plain], [keep], u)[0]


def compensated_many(w: np.ndarray, plains: list[QuantizedTensor], keeps: list[np.ndarray],
                     u: np.ndarray, headroom: float = HEADROOM) -> list[QuantizedTensor]:
    """compensated_codes of one weight at several points at once (their steps, codes and masks).

    Every channel of every point is a row of one matrix: rows do not interact in the rounding, so
    one pass over the columns serves all points (the per-column work is what costs: 90 LeNet-5
    points one by one took 5 s, at once well under one). ``headroom`` scales each channel's code
    limit (ceil(headroom x its largest plain |code|), at most the coder's MAX_CODE; HEADROOM by
    default). Raises ValueError as compensated_codes.
    """
    if not plains:
        return []
    axis = plains[0].out_axis
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    for plain, keep in zip(plains, keeps, strict=True):
        if keep.shape != w.shape or u.shape != (rows.shape[1], rows.shape[1]) or len(plain.steps) != rows.shape[0] \
                or plain.out_axis != axis:
            raise ValueError(f"weight {plain.name!r} of shape {w.shape} does not fit a mask of {keep.shape}, "
                             f"a Hessian factor of {u.shape} or {len(plain.steps)} steps along axis {plain.out_axis}")
    steps = np.concatenate([p.steps.astype(np.float64) for p in plains])
    # the points' rows side by side, a column of the weight per row of memory: the pass reads columns
    live_t = np.concatenate([np.moveaxis(k, axis, 0).reshape(rows.shape).T for k in keeps], axis=1) & (steps > 0)
    largest = np.concatenate([np.abs(np.moveaxis(p.codes, axis, 0).reshape(rows.shape)).max(axis=1) for p in plains])
    limit = np.where(largest > 0, np.minimum(np.ceil(headroom * np.maximum(largest, 1)), MAX_CODE), 0)
    codes = _round_columns(np.tile(rows.T, (1, len(plains))), steps, live_t, limit, u).T
    out = []
    for k, plain in enumerate(plains):
        part = codes[k * rows.shape[0]:(k + 1) * rows.shape[0]].reshape(moved.shape)
        out.append(QuantizedTensor(plain.name, np.moveaxis(part, 0, axis).astype(plain.codes.dtype), plain.steps, axis))
    return out


def _round_columns(work: np.ndarray, steps: np.ndarray, live_t: np.ndarray, limit: np.ndarray,
                   u: np.ndarray) -> np.ndarray:
    """The GPTQ pass over the weight columns, ``work`` [columns, rows] (float64, changed in place;
    one step, code limit and, in ``live_t``, mask per row); returns int32 codes [columns, rows]."""
    safe = np.where(steps > 0, steps, 1.0)
    codes = np.zeros(work.shape, dtype=np.int32)
    # columns in blocks (GPTQ's lazy batch): within a block the error moves column by column, onto
    # the columns after it in one matrix product
    for b0 in range(0, work.shape[0], _BLOCK):
        b1 = min(b0 + _BLOCK, work.shape[0])
        errors = np.zeros((b1 - b0, work.shape[1]))
        for j in range(b0, b1):
            c = np.where(live_t[j], np.clip(np.rint(work[j] / safe), -limit, limit), 0)
            codes[j] = c
            errors[j - b0] = (work[j] - c * steps) / u[j, j]
            work[j + 1:b1] -= u[j, j + 1:b1, None] * errors[j - b0]
        work[b1:] -= u[b0:b1, b1:].T @ errors
    return codes


def code_differences(compensated: list[QuantizedTensor], plain: list[QuantizedTensor]) -> dict[str, np.ndarray]:
    """Compensated minus plain codes of each weight where any differs (int16; a box adds them back).

    Raises ValueError when the two lists name different weights or a difference leaves int16.
    """
    out = {}
    for c, p in zip(compensated, plain, strict=True):
        if c.name != p.name:
            raise ValueError(f"compensated codes of {c.name!r} paired with plain codes of {p.name!r}")
        d = c.codes.astype(np.int64) - p.codes.astype(np.int64)
        if np.abs(d).max(initial=0) > np.iinfo(np.int16).max:
            raise ValueError(f"the compensated codes of {c.name!r} move {np.abs(d).max()} steps from the plain ones")
        if d.any():
            out[c.name] = d.astype(np.int16)
    return out


def with_differences(plain: list[QuantizedTensor], differences: dict[str, np.ndarray]) -> list[QuantizedTensor]:
    """``plain`` with each weight's code differences added (the inverse of code_differences).

    Raises ValueError for a difference of another shape than its weight's codes.
    """
    out = []
    for q in plain:
        d = differences.get(q.name)
        if d is None:
            out.append(q)
            continue
        if d.shape != q.codes.shape:
            raise ValueError(f"code differences of shape {d.shape} for {q.name!r} of shape {q.codes.shape}")
        out.append(QuantizedTensor(q.name, (q.codes.astype(np.int64) + d).astype(q.codes.dtype), q.steps, q.out_axis))
    return out
