"""Band coding: master codes grouped by prune class, so a box that prunes reads only its survivors.

With codes sent for every weight, a box pruning 70% of LeNet-5 downloaded the magnitudes of the
weights it zeroes (its bit planes cost 30 KB; its survivors' codes are worth about 10). Here
the prune classes come first, as a chain of masks from the top class down (``encode_mask``:
split j marks, among the weights of class <= j + 1, those of class j + 1), and then each class's
weights travel in a band of their own. A box pruning at grid level L reads the masks down to L,
which tell every survivor's class exactly, and the bands L + 1 .. G.

A band holds, per tensor and in index order, its weights' codes q as
- the bit length l of |q| (0..13), range-coded with the tensor's counts (one byte each, scaled to
  at most 255: the table costs a few bytes, the rounding a fraction of a percent);
- the sign of every non-zero code and the bits of |q| below its leading one, down to the tensor's
  top bit B, raw (a bit below the leading one is close to a fair coin);
- in a ``fine`` part per bit b below B (of the tensors whose B is above b): a plan reads the
  tensors down to the bits its octaves need (octave k reads |q| >> (k - 1)) and stops there.

Layouts (little-endian): mask: u32 tensors, per tensor u32 ones, then the range coder's u32 words.
Band top: u32 tensors, per tensor u8 buckets and that many u8 counts, u32 stream words, the
stream, then the packed raw bits. Band fine: u8 the bit, then its packed raw bits.
"""

from __future__ import annotations

import struct

import numpy as np

from toco_core.compression.plane_coding import _decode, _encode

MAX_LENGTH = 13  # |q| <= 4095 has at most 12 bits; lengths 0..12, one spare


def bit_lengths(mag: np.ndarray) -> np.ndarray:
    """The bit length of each non-negative integer (0 for 0): floor(log2 m) + 1."""
    out = np.zeros(mag.shape, np.int64)
    for b in range(MAX_LENGTH):
        out += mag >= (1 << b)
    return out


# --- masks -------------------------------------------------------------------------------------

def encode_mask(masks: list[np.ndarray]) -> bytes:
    """Boolean masks (one per tensor, any length), each coded with its own share of ones."""
    ones = [int(m.sum()) for m in masks]
    counts = np.array([[m.size - k, k] for m, k in zip(masks, ones, strict=True)], np.int64).reshape(-1, 2)
    syms = np.concatenate([m.astype(np.int64) for m in masks]) if masks else np.zeros(0, np.int64)
    ctx = np.concatenate([np.full(m.size, t) for t, m in enumerate(masks)]) if masks else np.zeros(0, np.int64)
    return struct.pack("<I", len(masks)) + np.asarray(ones, "<u4").tobytes() + _encode(syms, ctx, counts)


def decode_mask(data: bytes, sizes: list[int]) -> list[np.ndarray]:
    """Inverse of encode_mask for masks of the given lengths. Raises ValueError when damaged."""
    end = 4 + 4 * len(sizes)
    if len(data) < end or struct.unpack_from("<I", data)[0] != len(sizes):
        raise ValueError(f"the mask does not describe {len(sizes)} tensors")
    ones = np.frombuffer(data[4:end], "<u4").astype(np.int64)
    if (ones > np.asarray(sizes, np.int64)).any():
        raise ValueError("the mask counts more ones than weights")
    counts = np.stack([np.asarray(sizes, np.int64) - ones, ones], axis=1)
    ctx = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)]) if sizes else np.zeros(0, np.int64)
    bits = _decode(data[end:], ctx, counts)
    if bits.size != sum(sizes) or (bits > 1).any():
        raise ValueError("the mask's stream is damaged")
    return [b.astype(bool) for b in np.split(bits, np.cumsum(sizes)[:-1])] if sizes else []


# --- bands -------------------------------------------------------------------------------------

def _scaled_counts(lengths: np.ndarray) -> np.ndarray:
    counts = np.bincount(lengths, minlength=1).astype(np.int64)
    top = int(counts.max(initial=0))
    if top == 0:
        return np.zeros(0, np.int64)
    scaled: np.ndarray = np.where(counts > 0, np.maximum(1, (counts * 255 + top - 1) // top), 0)
    return scaled


def _raw_bits(mag: np.ndarray, lengths: np.ndarray, low: int, high: int | None) -> np.ndarray:
    """Bits b of |q| with low <= b < min(l - 1, high), bit-major from the highest b down."""
    top = int(lengths.max(initial=0)) - 2
    parts = [(np.right_shift(mag[lengths - 2 >= b], b) & 1) for b in range(top, low - 1, -1)
             if high is None or b < high]
    return np.concatenate(parts).astype(np.uint8) if parts else np.zeros(0, np.uint8)


def _put_bits(mag: np.ndarray, lengths: np.ndarray, low: int, high: int | None, bits: np.ndarray) -> int:
    """Inverse of _raw_bits: writes the bits into ``mag`` (in place); returns how many it read."""
    pos = 0
    for b in range(int(lengths.max(initial=0)) - 2, low - 1, -1):
        if high is not None and b >= high:
            continue
        idx = np.flatnonzero(lengths - 2 >= b)
        if pos + idx.size > bits.size:
            raise ValueError("the band's raw bits are truncated")
        mag[idx] |= bits[pos:pos + idx.size].astype(np.int64) << b
        pos += idx.size
    return pos


def encode_band(codes: list[np.ndarray], top_bits: list[int]) -> tuple[bytes, dict[int, bytes]]:
    """(top part, {bit b: fine part}) of one band: per tensor, the 1-D codes of its weights in the band.

    Top: bit lengths, signs and the bits down to ``top_bits[t]``; fine part b: bit b of the tensors
    with top_bits[t] > b, b = max(top_bits) - 1 .. 0. Raises ValueError for a code beyond +-4095.
    """
    head, syms, ctxs, tables, raw = [struct.pack("<I", len(codes))], [], [], [], []
    fine: dict[int, list[np.ndarray]] = {b: [] for b in range(max(top_bits, default=0) - 1, -1, -1)}
    for t, (q, tb) in enumerate(zip(codes, top_bits, strict=True)):
        mag = np.abs(q.astype(np.int64))
        if mag.size and int(mag.max()) >= 1 << (MAX_LENGTH - 1):
            raise ValueError(f"a code of {int(mag.max())} does not fit the band coder")
        lengths = bit_lengths(mag)
        scaled = _scaled_counts(lengths)
        head.append(struct.pack("<B", scaled.size) + scaled.astype(np.uint8).tobytes())
        tables.append(np.pad(scaled, (0, MAX_LENGTH + 1 - scaled.size)))
        syms.append(lengths)
        ctxs.append(np.full(lengths.size, t))
        raw += [(q[mag > 0] < 0).astype(np.uint8), _raw_bits(mag, lengths, tb, None)]
        for b in range(tb - 1, -1, -1):
            fine[b].append(_raw_bits(mag, lengths, b, b + 1))
    counts = np.stack(tables) if tables else np.zeros((0, MAX_LENGTH + 1), np.int64)
    stream = _encode(np.concatenate(syms) if syms else np.zeros(0, np.int64),
                     np.concatenate(ctxs) if ctxs else np.zeros(0, np.int64), counts)
    bits = np.concatenate(raw) if raw else np.zeros(0, np.uint8)
    top = b"".join(head) + struct.pack("<I", len(stream) // 4) + stream + np.packbits(bits).tobytes()
    # a fine part starts with its bit: never empty (a part of 0 bytes cannot be requested), and a part
    # filed under the wrong bit is refused
    return top, {b: struct.pack("<B", b) + np.packbits(np.concatenate(v) if v else np.zeros(0, np.uint8)).tobytes()
                 for b, v in fine.items()}


def decode_band(top: bytes, fine: dict[int, bytes], sizes: list[int], top_bits: list[int],
                stop_bits: list[int] | None = None) -> list[np.ndarray]:
    """Inverse of encode_band for tensors with ``sizes`` weights in the band: per tensor the codes
    truncated to sign(q) (|q| >> stop_bits[t]) (default: top_bits). ``fine`` must hold the parts
    of bits stop_bits[t] .. top_bits[t] - 1 of every tensor. Raises ValueError when damaged."""
    stop = list(top_bits) if stop_bits is None else list(stop_bits)
    lengths_all, raw = _decode_top(top, sizes)
    out, mags, rpos = [], [], 0
    for lengths, tb in zip(np.split(lengths_all, np.cumsum(sizes)[:-1]) if sizes else [], top_bits, strict=True):
        nz = lengths > 0
        signs = raw[rpos:rpos + int(nz.sum())]
        if signs.size != int(nz.sum()):
            raise ValueError("the band's signs are truncated")
        rpos += signs.size
        mag = np.where(nz, np.left_shift(1, np.maximum(lengths - 1, 0)), 0).astype(np.int64)
        rpos += _put_bits(mag, lengths, tb, None, raw[rpos:])
        sign = np.ones(lengths.size, np.int64)
        sign[np.flatnonzero(nz)[signs == 1]] = -1
        mags.append((mag, lengths, sign))
    for b in range(max(top_bits, default=0) - 1, -1, -1):
        if not any(st <= b < tb for st, tb in zip(stop, top_bits, strict=True)):
            continue
        if b not in fine:
            raise ValueError(f"the band's fine bit {b} is missing")
        if fine[b][:1] != struct.pack("<B", b):
            raise ValueError(f"the band's fine part for bit {b} holds another bit")
        bits, pos = np.unpackbits(np.frombuffer(fine[b][1:], np.uint8)), 0
        for (mag, lengths, _), tb in zip(mags, top_bits, strict=True):
            if tb > b:
                pos += _put_bits(mag, lengths, b, b + 1, bits[pos:])
    for (mag, _, sign), s in zip(mags, stop, strict=True):
        out.append((sign * np.right_shift(mag, s)).astype(np.int32))
    return out


def _decode_top(top: bytes, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(bit lengths of every weight, the raw bits after the stream) of a band's top part."""
    if len(top) < 4 or struct.unpack_from("<I", top)[0] != len(sizes):
        raise ValueError(f"the band does not describe {len(sizes)} tensors")
    pos, tables = 4, []
    for _ in sizes:
        if pos >= len(top) or top[pos] > MAX_LENGTH + 1 or pos + 1 + top[pos] > len(top):
            raise ValueError("the band's count table is truncated")
        n = top[pos]
        table = np.frombuffer(top[pos + 1:pos + 1 + n], np.uint8).astype(np.int64)
        tables.append(np.pad(table, (0, MAX_LENGTH + 1 - n)))
        pos += 1 + n
    if pos + 4 > len(top):
        raise ValueError("the band is truncated")
    words = struct.unpack_from("<I", top, pos)[0]
    stream, rest = top[pos + 4:pos + 4 + 4 * words], top[pos + 4 + 4 * words:]
    ctx = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)]) if sizes else np.zeros(0, np.int64)
    lengths = _decode(stream, ctx, np.stack(tables) if tables else np.zeros((0, MAX_LENGTH + 1)))
    return lengths, np.unpackbits(np.frombuffer(rest, np.uint8))
