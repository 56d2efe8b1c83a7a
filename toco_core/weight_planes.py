"""Weight planes: the master codes and prune classes as parts a box reads from the top down.

``weight_parts`` packs codes/top, a bit plane per tensor and bit (codes/{b}/{k}) and the prune
tree's splits (prune/{t}) with toco_core.compression.plane_coding; ``LadderLayout`` (the head's
ladder.json) says how; ``top_codes``, ``ladders_from_planes`` and ``classes_from_planes`` decode
whatever contiguous planes a box holds. Bundles packed with one plane for all tensors
(codes/{b}) or a chain of prune planes say so in their layout and still decode.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from toco_core.compression import plane_coding as planes
from toco_core.compression.nested import CodeLadder
from toco_core.errors import BundleError
from toco_core.plan_table import PlanTable


class LadderLayout(BaseModel):
    """How the weight planes are laid out: tensor order and shapes, top octave, prune scales."""

    model_config = ConfigDict(extra="forbid")

    tensors: list[str]
    shapes: list[list[int]]
    out_axes: list[int]
    top_octave: int
    prune_levels: int
    prune_context_bit: int = Field(description="prune planes are coded in contexts of |q| >> this bit, "
                                               "which every pruning plan's bit planes reach")
    bias_parts: bool = Field(False, description="corrected biases travel per point (bias/*), not as samples")
    prune_tree: Literal["chain", "balanced"] = Field("chain", description="the shape of the prune planes' tree")
    prune_context_bits: list[int] | None = Field(None, description="per tensor (else prune_context_bit for all)")
    plane_parts: Literal["plane", "tensor"] = Field("plane", description="codes/{b} for all tensors, or "
                                                                           "codes/{b}/{k} per tensor k")


def _rows(codes: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def truncate(q: np.ndarray, b: int) -> np.ndarray:
    """sign(q) * (|q| >> b): the codes known down to bit b."""
    return (np.sign(q) * np.right_shift(np.abs(q.astype(np.int64)), b)).astype(np.int32)


def lowest_bits(table: PlanTable, i: int) -> list[int]:
    """Per tensor, the finest bit plane point ``i`` needs: octave k reads |q| down to bit k - 1
    (octave 0: bit 0), so the tensor's finest channel octave decides."""
    return [max(int(table.octaves[t][i].min()) - 1, 0) if table.octaves[t].shape[1] else 0 for t in table.tensors]


def weight_parts(ladders: dict[str, CodeLadder], classes: dict[str, np.ndarray],
                  table: PlanTable) -> tuple[dict[str, bytes], int, list[int]]:
    """codes/top, codes/{b}/{k} (bit plane b of tensor k) and prune/{t} (a balanced prune tree) of
    the master codes; returns them, the top octave and per tensor the prune context bit (the
    coarsest bit every pruning point reads of that tensor anyway)."""
    names = list(table.tensors)
    top = max([int(table.octaves[n].max(initial=0)) for n in names] + [0])
    axes = dict(zip(names, table.out_axes))
    masters = [ladders[n].master for n in names]
    top_codes = [truncate(q, max(top - 1, 0)) for q in masters]
    parts = {"codes/top": planes.encode_top([_rows(c, axes[n]) for c, n in zip(top_codes, names)])}
    # a plane per tensor: a point's channels of one layer often need a finer octave than the rest
    # (LeNet-5's handheld: 9 channels of one layer at octave 3, every other at 4 or coarser)
    for b in range(max(top - 1, 0) - 1, -1, -1):
        for k, q in enumerate(masters):
            parts[f"codes/{b}/{k}"] = planes.encode_bit_plane([q], b)
    pruning = [lowest_bits(table, i) for i, (p, _) in enumerate(table.points) if p > 0]
    context_bits = [max([bits[k] for bits in pruning] + [0]) for k in range(len(names))]
    coarse = [truncate(q, cb) for q, cb in zip(masters, context_bits)]
    for node in planes.prune_tree(len(table.prune_grid), "balanced"):
        parts[f"prune/{node[2]}"] = planes.encode_prune_plane([classes[n] for n in names], coarse, node)
    return parts, top, context_bits


def top_codes(lay: LadderLayout, parts: dict[str, bytes]) -> list[np.ndarray]:
    """Every tensor's codes/top codes in its own shape."""
    moved = [(s[a],) + tuple(d for i, d in enumerate(s) if i != a) for s, a in zip(lay.shapes, lay.out_axes)]
    try:
        rows = planes.decode_top(parts["codes/top"], [(m[0], int(np.prod(m[1:]))) for m in moved])
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"the bundle's codes/top part does not decode: {exc}", "fetch the bundle again") from None
    return [np.moveaxis(r.reshape(m), 0, a) for r, m, a in zip(rows, moved, lay.out_axes)]


def ladders_from_planes(lay: LadderLayout, parts: dict[str, bytes], top: list[np.ndarray]) -> dict[str, CodeLadder]:
    """Code ladders from the top codes and, per tensor, the bit planes present contiguously from the top."""
    top_bit = max(lay.top_octave - 1, 0)
    current, bits = list(top), [top_bit] * len(top)
    for b in range(top_bit - 1, -1, -1):
        for k in range(len(top)) if lay.plane_parts == "tensor" else [None]:
            name = f"codes/{b}" if k is None else f"codes/{b}/{k}"
            tensors = range(len(top)) if k is None else [k]
            if name not in parts or any(bits[t] != b + 1 for t in tensors):
                continue
            try:
                decoded = planes.decode_bit_plane(parts[name], [current[t] for t in tensors])
            except (ValueError, RuntimeError) as exc:
                raise BundleError(f"bit plane {name} of the bundle does not decode: {exc}",
                                  "fetch the bundle again") from None
            for t, c in zip(tensors, decoded):
                current[t], bits[t] = c, b
    return {n: CodeLadder(a, truncated=c, bit=bit) for n, a, c, bit in zip(lay.tensors, lay.out_axes, current, bits)}


def classes_from_planes(lay: LadderLayout, parts: dict[str, bytes], ladders: dict[str, CodeLadder]) -> dict[str, np.ndarray]:
    """Prune classes as far as the prune planes present resolve them: a weight's class is the top
    of its known interval, so pruning at any level the planes resolve (class <= level) reads true.

    Raises BundleError when prune planes are present but the bit planes their contexts need are
    not, or a plane does not decode.
    """
    known = planes.all_unknown([tuple(s) for s in lay.shapes], lay.prune_levels)
    tree = planes.prune_tree(lay.prune_levels, lay.prune_tree)
    if not any(f"prune/{t}" in parts for _, _, t in tree):
        return {n: hi for n, (_, hi) in zip(lay.tensors, known)}
    context = lay.prune_context_bits or [lay.prune_context_bit] * len(lay.tensors)
    if any(ladders[n].bit > c for n, c in zip(lay.tensors, context)):
        raise BundleError(f"prune planes need the weight bit planes down to {context}",
                          "fetch the parts the plan lists")
    top = [truncate(ladders[n].truncated, c - ladders[n].bit) for n, c in zip(lay.tensors, context)]
    applied = set()
    for lo, hi, t in tree:  # parents first: a split applies once its range is known
        parent_known = (lo, hi) == (0, lay.prune_levels) or any(
            (lo == plo and hi == pt) or (lo == pt + 1 and hi == phi) for plo, phi, pt in applied)
        if f"prune/{t}" not in parts or not parent_known:
            continue
        try:
            known = planes.decode_prune_plane(parts[f"prune/{t}"], known, top, (lo, hi, t))
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"prune plane {t} of the bundle does not decode: {exc}", "fetch the bundle again") from None
        applied.add((lo, hi, t))
    return {n: hi for n, (_, hi) in zip(lay.tensors, known)}


def plane_names(lay: LadderLayout, bits: list[int]) -> list[str]:
    """The bit-plane parts a box needs to read tensor k down to bit ``bits[k]``."""
    top_bit = max(lay.top_octave - 1, 0)
    if lay.plane_parts == "plane":
        return [f"codes/{b}" for b in range(top_bit - 1, min(bits + [top_bit]) - 1, -1)]
    return [f"codes/{b}/{k}" for k, bit in enumerate(bits) for b in range(top_bit - 1, bit - 1, -1)]
