"""Weight planes: the master codes and prune classes as parts a box reads from the top down.

``weight_parts`` packs codes/top, a bit plane per tensor and bit (codes/{b}/{k}) and the prune
tree's splits (prune/{t}) with toco_core.compression.plane_coding; ``LadderLayout`` (the head's
ladder.json) says how; ``top_codes``, ``ladders_from_planes`` and ``classes_from_planes`` decode
whatever contiguous planes a box holds. Bundles packed with one plane for all tensors
(codes/{b}) or a chain of prune planes say so in their layout and still decode.

This is the layout of bundles packed before bands (toco_core.weight_bands, where a pruning box
reads only the codes it keeps); ``LadderLayout`` and ``lowest_bits`` serve both.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from toco_core.compression import plane_coding as planes
from toco_core.compression.nested import CodeLadder, prune_level
from toco_core.errors import BundleError
from toco_core.plan_table import PlanTable


class LadderLayout(BaseModel):
    """How the weight planes are laid out: tensor order and shapes, top octave, prune scales."""

    model_config = ConfigDict(extra="forbid")

    tensors: list[str]
    shapes: list[list[int]]
    out_axes: list[int]
    top_octave: int
    top_bits: list[int] | None = Field(None, description="per tensor, the bit codes/top starts at (else "
                                                         "top_octave - 1 for all)")
    prune_levels: int
    prune_context_bit: int = Field(description="prune planes are coded in contexts of |q| >> this bit, "
                                               "which every pruning plan's bit planes reach")
    bias_parts: bool = Field(False, description="corrected biases travel per point (bias/*), not as samples")
    rounding_parts: bool | None = Field(None, description="compensated code differences travel per point "
                                                          "(round/*); unset without compensated rounding, so "
                                                          "agents from before it refuse such a layout")
    prune_tree: Literal["chain", "balanced"] = Field("chain", description="the shape of the prune planes' tree")
    prune_node_bits: dict[str, list[int]] | None = Field(None, description="per prune split t, per tensor "
                                                         "(else prune_context_bit for all)")
    plane_parts: Literal["plane", "tensor", "band"] = Field(
        "plane", description="codes/{b} for all tensors, codes/{b}/{k} per tensor k, or band/{c} per prune "
                             "class c (toco_core.weight_bands)")
    band_bounds: list[int] | None = Field(None, description="the band layout's group bounds, grid levels "
                                                            "highest first (None: every level)")


def _rows(codes: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def truncate(q: np.ndarray, b: int) -> np.ndarray:
    """sign(q) * (|q| >> b): the codes known down to bit b."""
    result: np.ndarray = (np.sign(q) * np.right_shift(np.abs(q.astype(np.int64)), b)).astype(np.int32)
    return result


def lowest_bits(table: PlanTable, i: int) -> list[int]:
    """Per tensor, the finest bit plane point ``i`` needs: octave k reads |q| down to bit k - 1
    (octave 0: bit 0), so the tensor's finest channel octave decides."""
    return [max(int(table.octaves[t][i].min()) - 1, 0) if table.octaves[t].shape[1] else 0 for t in table.tensors]


def shared_top_bits(table: PlanTable) -> list[int]:
    """Per tensor, the finest bit every point reads (the finest octave of the coarsest point decides):
    what the top part holds, so no point needs a separate part per bit above it (LeNet-5: 30 parts
    fewer in the manifest every box receives)."""
    every = [lowest_bits(table, i) for i in range(len(table.points))]
    return [max([bits[k] for bits in every] + [0]) for k in range(len(table.tensors))]


def weight_parts(ladders: dict[str, CodeLadder], classes: dict[str, np.ndarray],
                 table: PlanTable) -> tuple[dict[str, bytes], int, list[int], dict[str, list[int]]]:
    """codes/top, codes/{b}/{k} (bit plane b of tensor k) and prune/{t} (a balanced prune tree) of
    the master codes; returns them, the top octave, per tensor the bit codes/top starts at and
    per prune split the bits its contexts use."""
    names = list(table.tensors)
    top = max([int(table.octaves[n].max(initial=0)) for n in names] + [0])
    axes = dict(zip(names, table.out_axes, strict=True))
    masters = [m for n in names if (m := ladders[n].master) is not None]
    if len(masters) != len(names):
        raise ValueError("writing the weight planes needs every tensor's master codes")
    top_bits = shared_top_bits(table)
    parts = {"codes/top": planes.encode_top([_rows(truncate(q, tb), axes[n])
                                             for q, tb, n in zip(masters, top_bits, names, strict=True)])}
    # a plane per tensor: a point's channels of one layer often need a finer octave than the rest
    # (LeNet-5's handheld: 9 channels of one layer at octave 3, every other at 4 or coarser)
    for k, (q, tb) in enumerate(zip(masters, top_bits, strict=True)):
        for b in range(tb - 1, -1, -1):
            parts[f"codes/{b}/{k}"] = planes.encode_bit_plane([q], b)
    node_bits = {}
    for node in planes.prune_tree(len(table.prune_grid), "balanced"):
        # a split's contexts use the coarsest bit every point reading it reads anyway: points at
        # the levels below it in the tree, so deeper splits get finer contexts than the root
        node_bits[str(node[2])] = bits = _context_bits(table, range(node[0], node[1]), len(names))
        coarse = [truncate(q, cb) for q, cb in zip(masters, bits, strict=True)]
        parts[f"prune/{node[2]}"] = planes.encode_prune_plane([classes[n] for n in names], coarse, node)
    return parts, top, top_bits, node_bits


def _context_bits(table: PlanTable, levels: range, n: int) -> list[int]:
    reading = [lowest_bits(table, i) for i, (p, _) in enumerate(table.points)
               if p > 0 and prune_level(table.prune_grid, p) in levels]
    return [max([bits[k] for bits in reading] + [0]) for k in range(n)]


def top_codes(lay: LadderLayout, parts: dict[str, bytes]) -> list[np.ndarray]:
    """Every tensor's codes/top codes in its own shape."""
    moved = [(s[a],) + tuple(d for i, d in enumerate(s) if i != a)
             for s, a in zip(lay.shapes, lay.out_axes, strict=True)]
    try:
        rows = planes.decode_top(parts["codes/top"], [(m[0], int(np.prod(m[1:]))) for m in moved])
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"the bundle's codes/top part does not decode: {exc}", "fetch the bundle again") from None
    return [np.moveaxis(r.reshape(m), 0, a) for r, m, a in zip(rows, moved, lay.out_axes, strict=True)]


def ladders_from_planes(lay: LadderLayout, parts: dict[str, bytes], top: list[np.ndarray]) -> dict[str, CodeLadder]:
    """Code ladders from the top codes and, per tensor, the bit planes present contiguously from the top."""
    top_bits = layout_top_bits(lay)
    current, bits = list(top), list(top_bits)
    for b in range(max(top_bits + [0]) - 1, -1, -1):
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
            for t, c in zip(tensors, decoded, strict=True):
                current[t], bits[t] = c, b
    return {n: CodeLadder(a, truncated=c, bit=bit)
            for n, a, c, bit in zip(lay.tensors, lay.out_axes, current, bits, strict=True)}


def classes_from_planes(lay: LadderLayout, parts: dict[str, bytes],
                        ladders: dict[str, CodeLadder]) -> dict[str, np.ndarray]:
    """Prune classes as far as the prune planes present resolve them: a weight's class is the top
    of its known interval, so pruning at any level the planes resolve (class <= level) reads true.

    Raises BundleError when prune planes are present but the bit planes their contexts need are
    not, or a plane does not decode.
    """
    known = planes.all_unknown([tuple(s) for s in lay.shapes], lay.prune_levels)
    tree = planes.prune_tree(lay.prune_levels, lay.prune_tree)
    if not any(f"prune/{t}" in parts for _, _, t in tree):
        return {n: hi for n, (_, hi) in zip(lay.tensors, known, strict=True)}
    applied: set[tuple[int, int, int]] = set()
    for lo, hi, t in tree:  # parents first: a split applies once its range is known
        parent_known = (lo, hi) == (0, lay.prune_levels) or any(
            (lo == plo and hi == pt) or (lo == pt + 1 and hi == phi) for plo, phi, pt in applied)
        if f"prune/{t}" not in parts or not parent_known:
            continue
        context = (lay.prune_node_bits or {}).get(str(t), [lay.prune_context_bit] * len(lay.tensors))
        if any(ladders[n].bit > c for n, c in zip(lay.tensors, context, strict=True)):
            raise BundleError(f"prune plane {t} needs the weight bit planes down to {context}",
                              "fetch the parts the plan lists")
        top = [truncate(ladders[n].truncated, c - ladders[n].bit) for n, c in zip(lay.tensors, context, strict=True)]
        try:
            known = planes.decode_prune_plane(parts[f"prune/{t}"], known, top, (lo, hi, t))
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"prune plane {t} of the bundle does not decode: {exc}",
                              "fetch the bundle again") from None
        applied.add((lo, hi, t))
    return {n: hi for n, (_, hi) in zip(lay.tensors, known, strict=True)}


def plane_names(lay: LadderLayout, bits: list[int]) -> list[str]:
    """The bit-plane parts a box needs to read tensor k down to bit ``bits[k]``."""
    top_bits = layout_top_bits(lay)
    if lay.plane_parts == "plane":
        return [f"codes/{b}" for b in range(top_bits[0] - 1, min(bits + top_bits) - 1, -1)]
    return [f"codes/{b}/{k}" for k, (bit, tb) in enumerate(zip(bits, top_bits, strict=True))
            for b in range(tb - 1, bit - 1, -1)]


def layout_top_bits(lay: LadderLayout) -> list[int]:
    """Per tensor, the bit the layout's top part (codes/top or band/{c}) reaches down to."""
    return lay.top_bits if lay.top_bits is not None else [max(lay.top_octave - 1, 0)] * len(lay.tensors)
