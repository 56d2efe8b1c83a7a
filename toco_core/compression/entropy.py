"""Entropy coding of integer weight codes with `constriction`'s range coder.

A tensor's codes are seen as rows = output channels, columns = everything else. Two
streams per row, both adaptive (the statistics are learnt from the rows already coded, so
no probability table is stored):

- the **mask** (code != 0), a binary symbol whose probability depends on a context of
  (row density bucket, column density bucket). The row density is exact side information
  (each row's non-zero count); the column density is the share of non-zeros in the same
  column among the rows above, which catches dead inputs (blank pixels) pruned in every
  channel;
- the **values** of the non-zero codes, a categorical over ``[-M, -m] u [m, M]`` where m and
  M are the row's smallest and largest non-zero |code| (side information: M is the "bits per
  channel"; m > 1 where pruning removed every small weight of the channel), one adaptive
  table per (m, M).

Only integer counts and IEEE +,/ feed the probabilities, so encoder and decoder compute
bit-identical models on any platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np

MAX_CODE = 4095  # largest |code| the value alphabet accepts (13-bit codes)
_ROW_BUCKETS = 8
_COL_BUCKETS = 5  # + one extra bucket for the first row, where no column statistics exist
_PRIOR = 0.4  # Krichevsky-Trofimov-like pseudo count for every adaptive table


@dataclass(frozen=True)
class SideInfo:
    """Per-row facts the decoder needs before it reads a row: non-zero count, min/max |code|.

    Rows without non-zeros have min_abs = max_abs = 0.
    """

    nnz: np.ndarray  # uint32, shape (rows,)
    min_abs: np.ndarray  # uint32, smallest non-zero |code|, shape (rows,)
    max_abs: np.ndarray  # uint32, shape (rows,)


def side_info(rows: np.ndarray) -> SideInfo:
    """Non-zero count, smallest and largest non-zero |code| of every row of a 2-D int array."""
    mags = np.abs(rows.astype(np.int64))
    big = np.where(mags > 0, mags, np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max)
    nnz = np.count_nonzero(rows, axis=1)
    return SideInfo(
        nnz=nnz.astype(np.uint32),
        min_abs=np.where(nnz > 0, big, 0).astype(np.uint32),
        max_abs=mags.max(axis=1, initial=0).astype(np.uint32),
    )


class _Model:
    """The adaptive statistics shared (by construction, not by transfer) by coder and decoder."""

    def __init__(self, n_cols: int) -> None:
        self.n_cols = n_cols
        self.mask_counts = np.full((_ROW_BUCKETS, _COL_BUCKETS + 1, 2), _PRIOR)
        self.col_nnz = np.zeros(n_cols, dtype=np.int64)
        self.rows_seen = 0
        self.value_counts: dict[tuple[int, int], np.ndarray] = {}

    def mask_contexts(self, nnz: int) -> tuple[int, np.ndarray]:
        row_b = min(_ROW_BUCKETS - 1, nnz * _ROW_BUCKETS // self.n_cols)
        if self.rows_seen == 0:
            return row_b, np.full(self.n_cols, _COL_BUCKETS)
        return row_b, np.minimum(_COL_BUCKETS - 1, self.col_nnz * _COL_BUCKETS // self.rows_seen)

    def mask_probs(self, nnz: int) -> tuple[np.ndarray, tuple[int, np.ndarray]]:
        ctx = self.mask_contexts(nnz)
        return self.mask_counts[ctx[0], ctx[1]], ctx

    def value_probs(self, lo: int, hi: int) -> np.ndarray:
        return self.value_counts.setdefault((lo, hi), np.full(2 * (hi - lo + 1), _PRIOR))

    def update(self, mask: np.ndarray, ctx: tuple[int, np.ndarray] | None, lo: int, hi: int,
               symbols: np.ndarray) -> None:
        if ctx is not None:
            # numpy's stubs take no index tuple for ufunc.at
            np.add.at(self.mask_counts, (ctx[0], ctx[1], mask), 1.0)  # type: ignore[arg-type]
        self.col_nnz += mask
        self.rows_seen += 1
        if symbols.size:
            table = self.value_counts[(lo, hi)]
            table += np.bincount(symbols, minlength=table.size)


def _to_symbols(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Non-zero codes in [-hi, -lo] u [lo, hi] -> symbols 0..2(hi-lo+1)-1 (negatives first)."""
    return np.where(values < 0, values + hi, values - lo + (hi - lo + 1)).astype(np.int32)


def _from_symbols(symbols: np.ndarray, lo: int, hi: int) -> np.ndarray:
    half = hi - lo + 1
    return np.where(symbols < half, symbols - hi, symbols - half + lo).astype(np.int32)


def _categorical(probs: np.ndarray) -> Any:
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_rows(rows: np.ndarray, side: SideInfo) -> bytes:
    """Entropy-code a 2-D int array (rows = channels). Returns the compressed bytes.

    ``side`` must be ``side_info(rows)``. Raises ValueError when a code exceeds MAX_CODE.
    """
    if int(side.max_abs.max(initial=0)) > MAX_CODE:
        raise ValueError(f"codes up to {int(side.max_abs.max())} exceed the coder's limit of {MAX_CODE}")
    n_rows, n_cols = rows.shape
    model = _Model(n_cols)
    enc = constriction.stream.queue.RangeEncoder()
    family = constriction.stream.model.Categorical(perfect=False)
    for r in range(n_rows):
        nnz, lo, hi = int(side.nnz[r]), int(side.min_abs[r]), int(side.max_abs[r])
        mask = (rows[r] != 0).astype(np.int32)
        ctx = None
        if 0 < nnz < n_cols:  # an all-zero or all-non-zero row needs no mask
            probs, ctx = model.mask_probs(nnz)
            enc.encode(mask, family, probs)
        symbols = np.zeros(0, np.int32)
        if nnz:
            symbols = _to_symbols(rows[r][mask.astype(bool)], lo, hi)
            enc.encode(symbols, _categorical(model.value_probs(lo, hi)))
        model.update(mask, ctx, lo, hi, symbols)
    result: bytes = enc.get_compressed().astype("<u4").tobytes()
    return result


def _check_side(side: SideInfo, r: int, n_cols: int) -> tuple[int, int, int]:
    nnz, lo, hi = int(side.nnz[r]), int(side.min_abs[r]), int(side.max_abs[r])
    ok = nnz <= n_cols and hi <= MAX_CODE and ((nnz == 0 and lo == hi == 0) or (nnz > 0 and 1 <= lo <= hi))
    if not ok:
        raise ValueError(f"row {r}: side information (nnz={nnz}, min={lo}, max={hi}) is inconsistent")
    return nnz, lo, hi


def decode_rows(data: bytes, side: SideInfo, n_cols: int) -> np.ndarray:
    """Inverse of encode_rows: the int32 array of shape (len(side.nnz), n_cols).

    Raises ValueError when ``data`` is not a whole number of 32-bit words, the side
    information is inconsistent, or the decoded mask disagrees with the non-zero counts.
    """
    if len(data) % 4:
        raise ValueError("compressed stream length is not a multiple of 4 bytes")
    n_rows = len(side.nnz)
    out = np.zeros((n_rows, n_cols), dtype=np.int32)
    model = _Model(n_cols)
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    family = constriction.stream.model.Categorical(perfect=False)
    for r in range(n_rows):
        nnz, lo, hi = _check_side(side, r, n_cols)
        ctx = None
        if nnz == 0 or nnz == n_cols:
            mask = np.full(n_cols, int(nnz > 0), dtype=np.int32)
        else:
            probs, ctx = model.mask_probs(nnz)
            mask = np.asarray(dec.decode(family, probs), dtype=np.int32)
            if int(mask.sum()) != nnz:
                raise ValueError(f"row {r}: decoded {int(mask.sum())} non-zeros, expected {nnz}")
        symbols = np.zeros(0, np.int32)
        if nnz:
            symbols = np.asarray(dec.decode(_categorical(model.value_probs(lo, hi)), nnz), dtype=np.int32)
            out[r, mask.astype(bool)] = _from_symbols(symbols, lo, hi)
        model.update(mask, ctx, lo, hi, symbols)
    return out


def estimate_bits(rows: np.ndarray) -> float:
    """Fast static estimate of the coded size in bits (no coder run).

    bits = sum_rows L * h(nnz_r / L) + sum_(m,M) sum_s -c_s log2(c_s / n_(m,M)), with h the
    binary entropy and c_s the histogram of non-zero symbols among the rows whose smallest
    and largest non-zero |code| are (m, M). The adaptive column context usually makes the
    real stream a little smaller, the learning of the tables a little larger.
    """
    side = side_info(rows)
    n_cols = rows.shape[1]
    p = side.nnz.astype(np.float64) / n_cols
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    bits = float(np.nansum(h) * n_cols)
    keys = side.min_abs.astype(np.int64) * (MAX_CODE + 1) + side.max_abs
    for key in np.unique(keys[side.nnz > 0]):
        lo, hi = int(key) // (MAX_CODE + 1), int(key) % (MAX_CODE + 1)
        sel = rows[keys == key]
        counts = np.bincount(_to_symbols(sel[sel != 0], lo, hi), minlength=2 * (hi - lo + 1)).astype(np.float64)
        counts = counts[counts > 0]
        bits += float(-(counts * np.log2(counts / counts.sum())).sum())
    return bits
