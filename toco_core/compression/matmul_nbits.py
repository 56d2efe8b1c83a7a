"""Block-wise 4/8-bit weights kept quantized at run time: onnxruntime's MatMulNBits (com.microsoft).

MatMulNBits computes Y = A @ dequant(B) with B [K, N] stored column by column in blocks of
``block_size`` consecutive K entries; per block one float32 scale s and one zero point z:

    q = clip(round(w / s) + z, 0, 2^bits - 1),   dequant = (q - z) * s,
    s = (max - min) / (2^bits - 1) over the block (range widened to include 0).

The quantization itself is onnxruntime's own kernel (the one MatMulNBitsQuantizer calls), so the
error computed here is exactly the error of the shipped model. The nodes are written directly
because every weight may get its own (bits, block_size).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from toco_core.compression.graph_edit import (
    GraphIndex,
    attr,
    clear_value_info,
    drop_unused_initializers,
    ensure_opset,
    replace_nodes,
)
from toco_core.errors import ConfigError, ModelError

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
_KERNELS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}


def _check_choice(bits: int, block_size: int) -> None:
    if bits not in BITS or block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"MatMulNBits choice (bits={bits}, block_size={block_size}) is not supported",
                          "use bits 4 or 8 and a power-of-two block size >= 16")


def _quantize(w_kn: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxruntime's block quantization of B [K, N]: packed [N, blocks, blob], scales [N, blocks], zp."""
    k, n = w_kn.shape
    blocks = -(-k // block_size)
    per_byte = 8 // bits
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = w_kn
    packed = np.zeros((n, blocks, block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks // per_byte)), dtype=np.uint8)
    _KERNELS[bits](packed, padded, scales, zero_points, block_size, n, k, False)
    return packed, scales, zero_points


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """Bytes -> unsigned codes along the last axis (4-bit: low nibble first)."""
    if bits == 8:
        return data.astype(np.int32)
    return np.stack([data & 0x0F, data >> 4], axis=-1).reshape(*data.shape[:-1], -1).astype(np.int32)


def _dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int) -> np.ndarray:
    """(q - z) * s back to B [K, N] (float32)."""
    n, blocks, _ = packed.shape
    q = _unpack(packed, bits)  # [N, blocks, block]
    z = _unpack(zero_points, bits)[:, :blocks, None]
    w = ((q - z).astype(np.float32) * scales[:, :, None]).reshape(n, -1)[:, :k]
    return np.ascontiguousarray(w.T)


def _as_kn(w: np.ndarray, k_axis: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or k_axis not in (0, 1, -1, -2):
        raise ValueError(f"MatMulNBits needs a 2-D weight and k_axis 0 or 1, got shape {w.shape}, k_axis {k_axis}")
    return np.ascontiguousarray(w if k_axis % 2 == 0 else w.T)


def nbits_weight_error(w: np.ndarray, bits: int, block_size: int, k_axis: int = 0) -> np.ndarray:
    """Per-weight |w - dequant(quant(w))| exactly as MatMulNBits stores the weight.

    ``w`` is 2-D; ``k_axis`` is its reduction (input-feature) axis: 0 for a MatMul weight
    [K, N], 1 for a Gemm weight with transB=1 [N, K] (in general ``1 - WeightInfo.out_axis``).
    Returns float32 of w's shape. Raises ConfigError for an unsupported (bits, block_size),
    ValueError for a weight that is not 2-D.
    """
    _check_choice(bits, block_size)
    w_kn = _as_kn(w, k_axis)
    deq = _dequantize(*_quantize(w_kn, bits, block_size), bits, w_kn.shape[0])
    err = np.abs(w_kn - deq)
    result: np.ndarray = err if k_axis % 2 == 0 else err.T
    return result


def nbits_nbytes(k: int, n: int, bits: int, block_size: int) -> int:
    """Bytes MatMulNBits keeps for a [K, N] weight: codes + float32 scales + packed zero points."""
    blocks = -(-k // block_size)
    return n * (blocks * block_size * bits // 8 + 4 * blocks + -(-blocks * bits // 8))


def best_nbits_choice(w: np.ndarray, tau: np.ndarray, coverage: float = 0.999,
                      k_axis: int = 0) -> tuple[int, int] | None:
    """The smallest (bits, block_size) whose error is within tau for >= ``coverage`` of the weights.

    Candidates are bits in (4, 8) x block sizes 16..256 (no block longer than K rounded up to a
    power of two), ordered by ``nbits_nbytes``. Returns None when no candidate qualifies.
    Raises ValueError when tau's shape differs from w's or coverage is outside (0, 1].
    """
    w = np.asarray(w, dtype=np.float32)
    if np.shape(tau) != w.shape or not 0 < coverage <= 1:
        raise ValueError(f"tau shape {np.shape(tau)} must equal weight shape {w.shape}, coverage in (0, 1]")
    k, n = _as_kn(w, k_axis).shape
    longest = max(16, 1 << max(k - 1, 1).bit_length())
    options = [(b, s) for b in BITS for s in BLOCK_SIZES if s <= longest]
    for bits, block in sorted(options, key=lambda c: (nbits_nbytes(k, n, *c), c)):
        if (nbits_weight_error(w, bits, block, k_axis) <= tau).mean() >= coverage:
            return bits, block
    return None


def quantize_matmul_nbits(model: onnx.ModelProto, choices: dict[str, tuple[int, int]],
                          accuracy_level: int = 4) -> onnx.ModelProto:
    """Replace the MatMul/Gemm layers of the named weights by MatMulNBits nodes.

    ``choices`` maps a weight's ONNX name to (bits, block_size). A Gemm becomes MatMulNBits +
    Add: B is transposed to [K, N] when transB=1, alpha is folded into B and beta * C becomes the
    Add's constant. ``accuracy_level`` is MatMulNBits' compute type: 4 (default) quantizes the
    activations to int8 per block on the fly, which adds activation rounding but is what makes
    the format fast (measured here, 4096x4096, batch 1, 1 thread: fp32 4.1 ms; 4-bit/128
    0.21 ms at level 4 vs 2.3 ms at level 0; 8-bit/128 1.2 ms at level 4 vs 121 ms at level 0).
    0 keeps float activations (exact weight-only error, slow). Returns a new model.
    Raises ConfigError for an unsupported choice, ModelError for a weight that is not the
    private constant 2-D weight of a MatMul or Gemm (transA=0).
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level {accuracy_level} is not one of MatMulNBits' levels 0-4",
                          "use 4 (int8 activations, fast) or 0 (float activations)")
    new = copy.deepcopy(model)
    g = GraphIndex(new)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    dead: set[str] = set()
    for name, (bits, block) in choices.items():
        _check_choice(bits, block)
        uses, w = g.consumers(name), g.tensor(name)
        node = uses[0][0] if len(uses) == 1 and uses[0][1] == 1 else None
        if node is None or w is None or w.ndim != 2 or node.op_type not in ("MatMul", "Gemm") \
                or attr(node, "transA", 0):
            raise ModelError(f"weight {name!r} is not the private 2-D constant weight of a MatMul or Gemm",
                             "choose MatMul/Gemm weights for MatMulNBits")
        w_kn = w.T if node.op_type == "Gemm" and attr(node, "transB", 0) else w
        if node.op_type == "Gemm":
            w_kn = w_kn * np.float32(attr(node, "alpha", 1.0))
        idx = next(i for i, n in enumerate(new.graph.node) if n.output[0] == node.output[0])
        replacements[idx] = _nbits_nodes(g, node, name, w_kn.astype(np.float32), bits, block, accuracy_level)
        dead.add(name)
    const_nodes: dict[int, list[onnx.NodeProto]] = {
        i: [] for i, n in enumerate(new.graph.node) if n.op_type == "Constant" and n.output[0] in dead}
    replace_nodes(new.graph, {**replacements, **const_nodes})
    drop_unused_initializers(new)
    ensure_opset(new, "com.microsoft", 1)
    clear_value_info(new)
    return new


def _nbits_nodes(g: GraphIndex, node: onnx.NodeProto, name: str, w_kn: np.ndarray, bits: int, block: int,
                 accuracy_level: int) -> list[onnx.NodeProto]:
    """MatMulNBits for one layer (+ Add for a Gemm's C)."""
    k, n = w_kn.shape
    packed, scales, zero_points = _quantize(w_kn, bits, block)
    inputs = [node.input[0],
              g.add_initializer(f"{name}_Q{bits}", packed),
              g.add_initializer(f"{name}_scales", scales.reshape(-1)),
              g.add_initializer(f"{name}_zero_points", zero_points.reshape(-1))]
    out = node.output[0]
    has_c = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    mm_out = g.unique_name(f"{out}_matmul") if has_c else out
    kwargs: dict[str, Any] = {"accuracy_level": accuracy_level} if accuracy_level else {}
    nodes = [helper.make_node("MatMulNBits", inputs, [mm_out], name=g.unique_name(f"{node.name or name}_Q{bits}"),
                              domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, **kwargs)]
    if has_c:
        c = g.tensor(node.input[2])
        if c is None:
            raise ModelError(f"Gemm {node.name!r} has a non-constant C", "MatMulNBits needs a constant bias")
        bias = g.add_initializer(f"{name}_bias", (c * np.float32(attr(node, "beta", 1.0))).astype(np.float32))
        nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=g.unique_name(f"{node.name}_bias")))
    return nodes
