"""Embedded coding of master codes and prune classes: coarse to fine, one part per plane.

Weights travel as planes that a box reads from the top down and may stop after any of them:

- ``top``: every weight's sign(q) * (|q| >> B), B = T - 1 for the top octave T (the coarsest any
  plan uses), with the row coder of toco_core.compression.entropy (channels as rows);
- bit plane b (b = B-1..0): bit b of |q|, in contexts of the magnitude known so far (0, 1, more),
  then the signs of the weights it makes non-zero; octave k needs the planes down to k - 1, so
  the planes nest (each halves every bin) and their sum costs about the entropy of q;
- prune plane t (t = 0..G-1, G prune scales): the split of a tree over the classes 0..G
  (``prune_tree``): among the weights whose class lies in the split's range lo..hi, whether it
  is <= t, in contexts of a coarse magnitude; a box pruning at grid level L reads the splits on
  the path to t = L (``prune_path``) and then knows, for every weight, which side of L it is on.

The statistics of each plane are counted by the encoder and sent in the plane's header (a few
integers per tensor), so the models are static and every symbol of a plane is coded in one
vectorised call. Probabilities come from integer counts by IEEE division, so encoder and
decoder compute the same models on any platform.

Plane layout: u32 tensor count, per tensor the u32 counts of each context's symbols, then the
range coder's u32 words.
"""

from __future__ import annotations

import struct

import constriction
import numpy as np

from toco_core.compression import entropy

_PRIOR = 0.5  # pseudo count: a symbol a plane never used still has a (tiny) codable probability


def _probs(counts: np.ndarray) -> np.ndarray:
    """Rows of probabilities from rows of symbol counts (float64, each row sums to 1)."""
    c = counts.astype(np.float64) + _PRIOR
    result: np.ndarray = c / c.sum(axis=-1, keepdims=True)
    return result


def _encode(symbols: np.ndarray, contexts: np.ndarray, counts: np.ndarray) -> bytes:
    enc = constriction.stream.queue.RangeEncoder()
    if symbols.size:
        family = constriction.stream.model.Categorical(perfect=False)
        enc.encode(symbols.astype(np.int32), family, _probs(counts)[contexts])
    result: bytes = enc.get_compressed().astype("<u4").tobytes()
    return result


def _decode(data: bytes, contexts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if len(data) % 4:
        raise ValueError("a plane's stream is not a whole number of 32-bit words")
    if not contexts.size:
        return np.zeros(0, np.int32)
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    return np.asarray(dec.decode(family, _probs(counts)[contexts]), dtype=np.int32)


def _pack(counts: list[np.ndarray], stream: bytes) -> bytes:
    flat = np.concatenate([c.ravel() for c in counts]).astype("<u4") if counts else np.zeros(0, "<u4")
    return struct.pack("<I", len(counts)) + flat.tobytes() + stream


def _unpack(data: bytes, n_tensors: int, per_tensor: int) -> tuple[np.ndarray, bytes]:
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != n_tensors:
        raise ValueError(f"the plane does not describe {n_tensors} tensors")
    end = 4 + 4 * n_tensors * per_tensor
    if len(data) < end:
        raise ValueError("the plane's header is truncated")
    return np.frombuffer(data[4:end], "<u4").astype(np.int64), data[end:]


# --- magnitude bit planes ----------------------------------------------------------------------

def _magnitude_contexts(truncated: np.ndarray) -> np.ndarray:
    """0: magnitude so far 0 (the bit is mostly 0), 1: magnitude 1, 2: larger."""
    return np.minimum(np.abs(truncated.ravel().astype(np.int64)), 2)


def encode_bit_plane(master: list[np.ndarray], b: int) -> bytes:
    """Bit b of every weight's |q| (tensor order) and the signs of the weights it makes non-zero.

    Contexts per tensor: the magnitude known so far (|q| >> (b + 1)) as 0, 1 or more, and one for
    the signs. Returns the part.
    """
    bits, bctx, signs, sctx, counts = [], [], [], [], []
    for t, q in enumerate(master):
        mag = np.abs(q.ravel().astype(np.int64))
        ctx = _magnitude_contexts(np.right_shift(mag, b + 1))
        bit = np.right_shift(mag, b) & 1
        new = (ctx == 0) & (bit == 1)
        sign = (q.ravel()[new] < 0).astype(np.int64)
        table = np.zeros((4, 2), np.int64)
        np.add.at(table, (ctx, bit), 1)
        table[3] = np.bincount(sign, minlength=2)
        bits.append(bit)
        bctx.append(ctx + 4 * t)
        signs.append(sign)
        sctx.append(np.full(sign.size, 3 + 4 * t))
        counts.append(table)
    stream = _encode(np.concatenate(bits + signs), np.concatenate(bctx + sctx),
                     np.concatenate(counts) if counts else np.zeros((0, 2)))
    return _pack(counts, stream)


def decode_bit_plane(data: bytes, truncated: list[np.ndarray]) -> list[np.ndarray]:
    """Codes known down to bit b from those known down to bit b + 1 and bit plane b's part.

    Raises ValueError when the part does not fit the tensors or its stream is damaged.
    """
    flat, stream = _unpack(data, len(truncated), 8)
    counts = flat.reshape(-1, 2)
    ctxs = [_magnitude_contexts(t) for t in truncated]
    n_bits = sum(c.size for c in ctxs)
    all_ctx = np.concatenate([c + 4 * t for t, c in enumerate(ctxs)]) if ctxs else np.zeros(0, int)
    if len(stream) % 4:
        raise ValueError("a plane's stream is not a whole number of 32-bit words")
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, dtype="<u4").astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    probs = _probs(counts)
    bits = np.asarray(dec.decode(family, probs[all_ctx]), dtype=np.int64) if n_bits else np.zeros(0, np.int64)
    news = [(c == 0) & (bits[sum(x.size for x in ctxs[:t]):][:c.size] == 1) for t, c in enumerate(ctxs)]
    sign_ctx: np.ndarray | list[int] = (np.concatenate([np.full(int(m.sum()), 3 + 4 * t) for t, m in enumerate(news)])
                                        if news else [])
    signs = np.asarray(dec.decode(family, probs[sign_ctx]), dtype=np.int64) if len(sign_ctx) else np.zeros(0, np.int64)
    out, pos, spos = [], 0, 0
    for t, new in zip(truncated, news, strict=True):
        mag = 2 * np.abs(t.ravel().astype(np.int64)) + bits[pos:pos + t.size]
        sign = np.sign(t.ravel().astype(np.int64))
        k = int(new.sum())
        sign[new] = np.where(signs[spos:spos + k] == 1, -1, 1)
        pos, spos = pos + t.size, spos + k
        out.append((sign * mag).reshape(t.shape).astype(np.int32))
    return out


# --- prune planes ------------------------------------------------------------------------------

_PRUNE_CONTEXTS = 7
PruneNode = tuple[int, int, int]  # (lo, hi, t): splits the weights of class lo..hi at "class <= t"


def prune_tree(levels: int, shape: str = "balanced") -> list[PruneNode]:
    """The splits that resolve prune classes 0..G (G = ``levels``), parents before children.

    ``balanced``: bisection, so pruning at any level reads about log2(G) planes (LeNet-5's
    handheld at level 3: 4 planes, 8.3 KB modelled, against 9 planes and 13.6 KB along the chain);
    ``chain``: G-1, G-2, .., 0 (bundles packed before the tree; the most aggressive level reads
    one plane, the gentlest all). Either way every class is coded once: the full bundle costs the same.
    """
    if shape == "chain":
        return [(0, j + 1, j) for j in range(levels - 1, -1, -1)]
    out: list[PruneNode] = []
    todo = [(0, levels)]
    while todo:
        lo, hi = todo.pop(0)
        if lo < hi:
            t = (lo + hi - 1) // 2
            out.append((lo, hi, t))
            todo += [(lo, t), (t + 1, hi)]
    return out


def prune_path(levels: int, level: int, shape: str = "balanced") -> list[PruneNode]:
    """The splits a box pruning at grid level ``level`` reads, root first."""
    by_range = {(lo, hi): (lo, hi, t) for lo, hi, t in prune_tree(levels, shape)}
    lo, hi, path = 0, levels, []
    while (lo, hi) in by_range:
        node = by_range[(lo, hi)]
        path.append(node)
        if node[2] == level:
            break
        lo, hi = (lo, node[2]) if level < node[2] else (node[2] + 1, hi)
    return path


def _prune_contexts(coarse: np.ndarray) -> np.ndarray:
    # large weights are rarely pruned: the bit length of the coarse magnitude (0..5, 6+) splits the
    # statistics (measured on LeNet-5: the prune planes shrink by a third against no context)
    mag = np.abs(coarse.ravel().astype(np.int64))
    length = np.zeros(mag.shape, np.int64)
    for b in range(_PRUNE_CONTEXTS - 1):
        length += mag >= (1 << b)
    return length


def encode_prune_plane(classes: list[np.ndarray], top: list[np.ndarray], node: PruneNode) -> bytes:
    """Prune plane of split ``node`` = (lo, hi, t): for the weights of class lo..hi, the bit
    class <= t (tensor order), in contexts of the weight's coarse magnitude (``top``: codes known
    down to the layout's prune context bit, which every pruning plan fetches anyway)."""
    lo, hi, t = node
    syms, ctxs, counts = [], [], []
    for k, (cls, tc) in enumerate(zip(classes, top, strict=True)):
        c = cls.ravel()
        sel = (c >= lo) & (c <= hi)
        bits = (c[sel] <= t).astype(np.int64)
        ctx = _prune_contexts(tc)[sel]
        table = np.zeros((_PRUNE_CONTEXTS, 2), np.int64)
        np.add.at(table, (ctx, bits), 1)
        counts.append(table)
        syms.append(bits)
        ctxs.append(ctx + _PRUNE_CONTEXTS * k)
    stream = _encode(np.concatenate(syms) if syms else np.zeros(0), np.concatenate(ctxs) if ctxs else np.zeros(0, int),
                     np.concatenate(counts) if counts else np.zeros((0, 2)))
    return _pack(counts, stream)


def decode_prune_plane(data: bytes, known: list[tuple[np.ndarray, np.ndarray]], top: list[np.ndarray],
                       node: PruneNode) -> list[tuple[np.ndarray, np.ndarray]]:
    """Apply the prune plane of split ``node`` to class intervals (lo, hi arrays per tensor) in
    which the node's weights are those whose interval is exactly (node lo, node hi).

    Returns the narrowed intervals. Raises ValueError for a damaged part.
    """
    lo, hi, t = node
    flat, stream = _unpack(data, len(known), 2 * _PRUNE_CONTEXTS)
    counts = flat.reshape(-1, 2)
    open_ = [(a.ravel() == lo) & (b.ravel() == hi) for a, b in known]
    ctx = [_prune_contexts(tc)[m] + _PRUNE_CONTEXTS * k for k, (tc, m) in enumerate(zip(top, open_, strict=True))]
    bits = _decode(stream, np.concatenate(ctx) if ctx else np.zeros(0, int), counts)
    out, pos = [], 0
    for (known_a, known_b), m in zip(known, open_, strict=True):
        a, b = known_a.ravel().copy(), known_b.ravel().copy()
        n = int(m.sum())
        below = bits[pos:pos + n] == 1
        idx = np.flatnonzero(m)
        b[idx[below]] = t
        a[idx[~below]] = t + 1
        pos += n
        out.append((a.reshape(known_a.shape), b.reshape(known_a.shape)))
    return out


def all_unknown(shapes: list[tuple[int, ...]], levels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class intervals before any prune plane: every weight in 0..G (G = the number of prune scales)."""
    return [(np.zeros(s, np.uint8), np.full(s, levels, np.uint8)) for s in shapes]


# --- top octave --------------------------------------------------------------------------------

def encode_top(rows: list[np.ndarray]) -> bytes:
    """Every tensor's top-octave codes as (channels, rest) rows, with the row coder and its side
    information (u16, or u32 where a count exceeds it). Raises ValueError for codes over 4095."""
    out = [struct.pack("<I", len(rows))]
    for r in rows:
        side = entropy.side_info(r)
        stream = entropy.encode_rows(r, side)
        wide = int(side.nnz.max(initial=0)) >= 1 << 16
        arrays = b"".join(a.astype("<u4" if wide else "<u2").tobytes() for a in (side.nnz, side.min_abs, side.max_abs))
        out.append(struct.pack("<BII", int(wide), len(arrays), len(stream)) + arrays + stream)
    return b"".join(out)


def decode_top(data: bytes, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of encode_top for tensors of the given (channels, rest) shapes.

    Raises ValueError when the part does not fit the shapes or is damaged.
    """
    if len(data) < 4 or struct.unpack_from("<I", data)[0] != len(shapes):
        raise ValueError(f"the top plane does not describe {len(shapes)} tensors")
    pos, out = 4, []
    for rows, cols in shapes:
        wide, n_arr, n_stream = struct.unpack_from("<BII", data, pos)
        pos += 9
        dt = np.dtype("<u4" if wide else "<u2")
        if n_arr != 3 * rows * dt.itemsize or pos + n_arr + n_stream > len(data):
            raise ValueError("the top plane's side information does not fit the tensor")
        arr = np.frombuffer(data[pos:pos + n_arr], dt).astype(np.uint32).reshape(3, rows)
        pos += n_arr
        out.append(entropy.decode_rows(data[pos:pos + n_stream], entropy.SideInfo(*arr), cols))
        pos += n_stream
    if pos != len(data):
        raise ValueError("the top plane has trailing bytes")
    return out
