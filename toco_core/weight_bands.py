"""Weight bands: the master codes as parts per group of prune classes, so a box fetches its survivors only.

The band layout (ladder.json ``plane_parts = "band"``, toco_core.compression.band_coding). A
weight's prune class c (0..G) is the first grid level that keeps it no longer (G: never pruned);
a box pruning at level L keeps the classes above L. The groups' bounds (``band_bounds``, grid
levels, highest first; default every level) cut the classes into groups (b_k, b_(k-1)]:

    prune/{j}            split j: among the weights whose class the earlier splits left in (lo, hi]
                         around j, which are of class <= j (the bounds first, highest first, then
                         the levels inside each group, top-down)
    band/{g}     g = the top class of a group: the codes of the group's weights, down to each
                 tensor's top bit
    fine/{g}/{b} bit b of them, for every tensor whose top bit lies above b

A box pruning at level L reads split L with the splits that place its candidates, and the bands of
the groups above L (with the group around L when L is not a bound, whose weights of class <= L it
zeroes). Why groups: a box that reads a split per level above its own learns which of its
survivors a more aggressive box would prune as well, which it never uses: on LeNet-5 that was 5.8
of the 12.2 KB of masks a box pruning 70% fetched. The fleet server lays a bundle out with its
boxes' planned levels as bounds (fleet_server.band_layout); with every level a bound (the default,
and bundles packed before bounds existed) each group is one class and the splits form one chain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toco_core.compression import band_coding as bands
from toco_core.compression.nested import CodeLadder
from toco_core.errors import BundleError


def normalized_bounds(bounds: Sequence[int] | None, levels: int) -> list[int]:
    """The group bounds, distinct and highest first (None: every level). Raises ValueError off the grid."""
    if bounds is None:
        return list(range(levels - 1, -1, -1))
    bad = [b for b in bounds if not 0 <= b < levels]
    if bad:
        raise ValueError(f"band bounds {bad} are not levels of a {levels}-level prune grid")
    return sorted(set(bounds), reverse=True)


def groups(bounds: list[int], levels: int) -> list[tuple[int, int]]:
    """The class groups (lo, hi] (classes lo + 1 .. hi), top-down: (b_1, G], (b_2, b_1], .., (-1, b_m]."""
    tops = [levels, *bounds]
    return [(lo, hi) for hi, lo in zip(tops, [*bounds, -1], strict=True)]


def split_order(bounds: list[int], levels: int) -> list[int]:
    """The order splits are coded in: the bounds, then each group's inner levels, top-down."""
    return bounds + [j for lo, hi in groups(bounds, levels) for j in range(hi - 1, lo, -1)]


def _intervals(order: list[int], levels: int) -> dict[int, tuple[int, int]]:
    """Per split j, the class range (lo, hi] its candidates lie in: the nearest earlier splits around j."""
    out: dict[int, tuple[int, int]] = {}
    seen: list[int] = []
    for j in order:
        out[j] = (max((s for s in seen if s < j), default=-1), min((s for s in seen if s > j), default=levels))
        seen.append(j)
    return out


def _ancestors(j: int, spans: dict[int, tuple[int, int]]) -> set[int]:
    """The splits a box must decode before split j: those that bound its candidates, recursively."""
    out: set[int] = set()
    todo = [s for s in spans[j] if s in spans]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += [t for t in spans[s] if t in spans]
    return out


def band_parts(masters: list[np.ndarray], classes: list[np.ndarray], levels: int, top_bits: list[int],
               bounds: Sequence[int] | None = None) -> dict[str, bytes]:
    """The splits and bands of the master codes (see module doc), classes 0..``levels``.

    Raises ValueError for bounds off the grid or a code beyond the band coder's range.
    """
    flat = [c.ravel() for c in classes]
    b = normalized_bounds(bounds, levels)
    parts = {}
    for j, (lo, hi) in _intervals(split_order(b, levels), levels).items():
        parts[f"prune/{j}"] = bands.encode_mask([c[(c > lo) & (c <= hi)] <= j for c in flat])
    for lo, hi in groups(b, levels):
        in_band = [q.ravel()[(k > lo) & (k <= hi)] for q, k in zip(masters, flat, strict=True)]
        top, fine = bands.encode_band(in_band, top_bits)
        parts[f"band/{hi}"] = top
        parts.update({f"fine/{hi}/{bit}": data for bit, data in fine.items()})
    return parts


def fine_bits(bits: list[int], top_bits: list[int]) -> list[int]:
    """The fine bits a box reads to get tensor t down to ``bits[t]``: b with bits[t] <= b < top_bits[t]
    for some t, highest first."""
    return [b for b in range(max(top_bits, default=0) - 1, -1, -1)
            if any(bit <= b < tb for bit, tb in zip(bits, top_bits, strict=True))]


def band_names(levels: int, level: int, bits: list[int], top_bits: list[int],
               bounds: Sequence[int] | None = None) -> list[str]:
    """The parts a box pruning at grid ``level`` (-1: not at all) reads to get every tensor down to
    ``bits[t]``: the splits that tell its survivors and place its bands, and the bands of the groups
    holding survivors, with the fine bits it reads."""
    b = normalized_bounds(bounds, levels)
    order = split_order(b, levels)
    spans = _intervals(order, levels)
    wanted = {s for s in b if s >= level} | ({level} if level >= 0 else set())
    need = wanted.union(*(_ancestors(s, spans) for s in wanted))
    names = [f"prune/{j}" for j in order if j in need]
    for _, hi in groups(b, levels):
        if hi > level:
            names += [f"band/{hi}"] + [f"fine/{hi}/{bit}" for bit in fine_bits(bits, top_bits)]
    return names


def _spans_of_weights(parts: dict[str, bytes], sizes: list[int], levels: int,
                      order: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per weight, the class range (lo, hi] the splits present resolve (those whose own bounding
    splits are present too; the others cannot be placed)."""
    lo = [np.full(n, -1, np.int64) for n in sizes]
    hi = [np.full(n, levels, np.int64) for n in sizes]
    spans, used = _intervals(order, levels), set[int]()
    for j in order:
        if f"prune/{j}" not in parts or not _ancestors(j, spans) <= used:
            continue
        cand = [np.flatnonzero((a < j) & (j < z)) for a, z in zip(lo, hi, strict=True)]
        try:
            below = bands.decode_mask(parts[f"prune/{j}"], [c.size for c in cand])
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"prune split {j} of the bundle does not decode: {exc}",
                              "fetch the bundle again") from None
        for a, z, c, m in zip(lo, hi, cand, below, strict=True):
            z[c[m]] = j
            a[c[~m]] = j
        used.add(j)
    return lo, hi


def _stop_bits(parts: dict[str, bytes], present: list[int], top_bits: list[int]) -> list[int]:
    """Per tensor, the finest bit every present band's fine parts reach (contiguously from its top)."""
    stop = []
    for tb in top_bits:
        bit = tb
        while bit > 0 and present and all(f"fine/{g}/{bit - 1}" in parts for g in present):
            bit -= 1
        stop.append(bit)
    return stop


def decode_bands(shapes: list[list[int]], out_axes: list[int], parts: dict[str, bytes], levels: int,
                 top_bits: list[int], bounds: Sequence[int] | None = None) -> tuple[list[CodeLadder], list[np.ndarray]]:
    """Code ladders and prune classes of every tensor from the splits and bands present.

    A weight's class is the top of the range the splits present resolve (exact at every level they
    resolve). Bands whose members the splits do not tell apart are not placed; weights of bands not
    placed read 0 (they are pruned at every level the splits resolve). Each tensor's ladder reaches
    the finest bit that every band placed has fine parts for. Raises BundleError when a part does not
    decode.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    b = normalized_bounds(bounds, levels)
    lo, hi = _spans_of_weights(parts, sizes, levels, split_order(b, levels))
    codes = [np.zeros(n, np.int64) for n in sizes]
    placed = []
    for glo, ghi in groups(b, levels):
        straddle = any(((a < glo) & (glo < z)).any() or ((a < ghi) & (ghi < z)).any()
                       for a, z in zip(lo, hi, strict=True))
        if f"band/{ghi}" in parts and not straddle:
            placed.append((glo, ghi))
    stop = _stop_bits(parts, [g for _, g in placed], top_bits)
    for glo, ghi in placed:
        members = [(a >= glo) & (z <= ghi) for a, z in zip(lo, hi, strict=True)]
        fine = {bit: parts[f"fine/{ghi}/{bit}"] for bit in range(max(top_bits, default=0))
                if f"fine/{ghi}/{bit}" in parts}
        try:
            got = bands.decode_band(parts[f"band/{ghi}"], fine, [int(m.sum()) for m in members], top_bits, stop)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"band {ghi} of the bundle does not decode: {exc}", "fetch the bundle again") from None
        for q, m, g in zip(codes, members, got, strict=True):
            q[m] = g
    ladders = [CodeLadder(a, truncated=q.reshape(s).astype(np.int32), bit=bit)
               for q, s, a, bit in zip(codes, shapes, out_axes, stop, strict=True)]
    return ladders, [z.reshape(s) for z, s in zip(hi, shapes, strict=True)]
