"""Weight bands: the master codes as parts per prune class, so a box fetches its survivors only.

The band layout (ladder.json ``plane_parts = "band"``, toco_core.compression.band_coding):

    prune/{j}            j = G-1 .. 0: among the weights of class <= j + 1, which are <= j
    band/{c}     c = 0 .. G: the codes of the weights of class c, down to each tensor's top bit
    fine/{c}/{b} bit b of them, for every tensor whose top bit lies above b

A box pruning at level L reads prune/{G-1} .. prune/{L} (every survivor's class, exactly) and the
bands L + 1 .. G; an unpruned plan reads every mask and band. What it costs: the full bundle
codes each weight's class once with no magnitude context, so a box that does not prune pays
the classes too (LeNet-5: about 24 KB), while a box pruning 70% stops reading the magnitudes
of the weights it zeroes (its weights download fell from 38 to about 22 KB).
"""

from __future__ import annotations

import numpy as np

from toco_core.compression import band_coding as bands
from toco_core.compression.nested import CodeLadder
from toco_core.errors import BundleError


def band_parts(masters: list[np.ndarray], classes: list[np.ndarray], levels: int, top_bits: list[int]) -> dict[str, bytes]:
    """The masks and bands of the master codes (see module doc), classes 0..``levels``."""
    flat = [c.ravel() for c in classes]
    parts = {f"prune/{j}": bands.encode_mask([c[c <= j + 1] <= j for c in flat]) for j in range(levels - 1, -1, -1)}
    for c in range(levels + 1):
        top, fine = bands.encode_band([q.ravel()[k == c] for q, k in zip(masters, flat)], top_bits)
        parts[f"band/{c}"] = top
        parts.update({f"fine/{c}/{b}": data for b, data in fine.items()})
    return parts


def fine_bits(bits: list[int], top_bits: list[int]) -> list[int]:
    """The fine bits a box reads to get tensor t down to ``bits[t]``: b with bits[t] <= b < top_bits[t]
    for some t, highest first."""
    return [b for b in range(max(top_bits, default=0) - 1, -1, -1)
            if any(bit <= b < tb for bit, tb in zip(bits, top_bits))]


def band_names(levels: int, level: int, bits: list[int], top_bits: list[int]) -> list[str]:
    """The parts a box pruning at grid ``level`` (-1: not at all) reads to get every tensor down to
    ``bits[t]``: the masks down to the level and the bands above it, with the fine bits it reads."""
    names = [f"prune/{j}" for j in range(levels - 1, max(level, 0) - 1, -1)]
    for c in range(levels, level, -1):
        names += [f"band/{c}"] + [f"fine/{c}/{b}" for b in fine_bits(bits, top_bits)]
    return names


def _classes(parts: dict[str, bytes], sizes: list[int], levels: int) -> tuple[list[np.ndarray], int]:
    """Class per weight as far as the masks present resolve them (the unresolved at the top of their
    range, which reads true for pruning at that level or above), and that lowest resolved level."""
    classes = [np.full(n, levels, np.int64) for n in sizes]
    j = levels - 1
    while j >= 0 and f"prune/{j}" in parts:
        open_ = [c == j + 1 for c in classes]
        try:
            below = bands.decode_mask(parts[f"prune/{j}"], [int(m.sum()) for m in open_])
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"prune mask {j} of the bundle does not decode: {exc}", "fetch the bundle again") from None
        for c, m, b in zip(classes, open_, below):
            c[np.flatnonzero(m)[b]] = j
        j -= 1
    return classes, j + 1


def _stop_bits(parts: dict[str, bytes], present: list[int], top_bits: list[int]) -> list[int]:
    """Per tensor, the finest bit every present band's fine parts reach (contiguously from its top)."""
    stop = []
    for tb in top_bits:
        bit = tb
        while bit > 0 and present and all(f"fine/{c}/{bit - 1}" in parts for c in present):
            bit -= 1
        stop.append(bit)
    return stop


def decode_bands(shapes: list[list[int]], out_axes: list[int], parts: dict[str, bytes], levels: int,
                 top_bits: list[int]) -> tuple[list[CodeLadder], list[np.ndarray]]:
    """Code ladders and prune classes of every tensor from the masks and bands present.

    Weights of bands not present read 0 (they are pruned at every level the masks resolve). Each
    tensor's ladder reaches the finest bit that every band present has fine parts for. Raises
    BundleError when a part does not decode.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    classes, resolved = _classes(parts, sizes, levels)
    codes = [np.zeros(n, np.int64) for n in sizes]
    # a band can be placed once its members are known: classes above the resolved level, all at 0
    present = [c for c in range(levels, -1, -1) if f"band/{c}" in parts and (c > resolved or resolved == 0)]
    stop = _stop_bits(parts, present, top_bits)
    for c in present:
        members = [k == c for k in classes]
        fine = {b: parts[f"fine/{c}/{b}"] for b in range(max(top_bits, default=0)) if f"fine/{c}/{b}" in parts}
        try:
            got = bands.decode_band(parts[f"band/{c}"], fine, [int(m.sum()) for m in members], top_bits, stop)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"band {c} of the bundle does not decode: {exc}", "fetch the bundle again") from None
        for q, m, g in zip(codes, members, got):
            q[m] = g
    ladders = [CodeLadder(a, truncated=q.reshape(s).astype(np.int32), bit=bit)
               for q, s, a, bit in zip(codes, shapes, out_axes, stop)]
    return ladders, [c.reshape(s) for c, s in zip(classes, shapes)]
