"""PlanTable: what a box needs, beyond the master codes, to build any calibrated plan exactly.

The analysis decides everything that reads the per-weight tolerances on the server, for every
measured curve point, and ships the decisions instead of the tolerances:

- ``master_steps``: the master step D_c of every output channel (float16-exact);
- ``octaves``: per point, the octave of every channel (toco_core.compression.nested);
- ``int8``: per point, which weights keep their int8 weight error within tolerance;
- ``nbits_block``: per point, the MatMulNBits 4-bit block size of each 2-D MatMul/Gemm weight
  whose error stays within tolerance (0: none);
- ``kept_share``: per prune level, the share of weights left once dead channels are removed
  (the solver's memory estimate).

A box then needs neither the fp32 base nor the tolerance map: the master codes, the prune
classes down to its level, and this table give the server's build bit for bit.

File: safetensors (no pickle) with the scalars and point list in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from toco_core.compression.nested import CodeLadder, nested_steps_ok, octave_steps, prune_level
from toco_core.compression.storage import QuantizedTensor
from toco_core.errors import AnalysisError

FORMAT = "toco-plan-table-v1"


@dataclass(frozen=True)
class PlanTable:
    """Per-point build decisions of one analysis (see module doc)."""

    master_scale: float
    prune_grid: tuple[float, ...]
    points: tuple[tuple[float, float], ...]
    tensors: tuple[str, ...]
    out_axes: tuple[int, ...]
    master_steps: dict[str, np.ndarray]
    octaves: dict[str, np.ndarray]  # uint8 [points, channels]
    int8: np.ndarray  # bool [points, tensors]
    nbits_block: np.ndarray  # uint16 [points, tensors]
    kept_share: np.ndarray  # float64 [len(prune_grid) + 1]: index 0 = no pruning

    def point_index(self, prune_scale: float, quant_scale: float) -> int:
        """Row of the point (prune_scale, quant_scale). Raises AnalysisError for an unmeasured point."""
        for i, (p, q) in enumerate(self.points):
            if abs(p - prune_scale) <= 1e-9 and abs(q - quant_scale) <= 1e-9:
                return i
        raise AnalysisError(f"no calibrated point at prune {prune_scale:g}, quant {quant_scale:g}",
                            "plan from this analysis' curves")

    def kept(self, prune_scale: float) -> float:
        """Share of weights left after removing the channels pruning at ``prune_scale`` empties."""
        return float(self.kept_share[prune_level(self.prune_grid, prune_scale) + 1])

    def finest_octave(self, i: int) -> int:
        """The finest octave any channel uses at point ``i`` (what the box must have fetched)."""
        return min((int(self.octaves[t][i].min()) for t in self.tensors if self.octaves[t].shape[1]), default=0)


def plan_codes(table: PlanTable, ladders: dict[str, CodeLadder], classes: dict[str, np.ndarray],
               prune_scale: float, quant_scale: float) -> list[QuantizedTensor]:
    """The codes and steps of every compressible weight at a calibrated point.

    Channel c of weight t at point i: codes of octave octaves[t][i, c] with step D_c 2^k, and 0
    where the weight's prune class is <= the point's prune level. ``classes`` may be collapsed
    below the box's level (max(class, j)): pruning at j or above reads them the same.
    Raises AnalysisError for an unmeasured point, ValueError when the ladders are too coarse.
    """
    i = table.point_index(prune_scale, quant_scale)
    level = prune_level(table.prune_grid, prune_scale)
    out = []
    for name, axis in zip(table.tensors, table.out_axes, strict=True):
        k = table.octaves[name][i]
        codes = ladders[name].codes(k)
        if level >= 0:
            codes = np.where(classes[name] <= level, 0, codes).astype(np.int32)
        out.append(QuantizedTensor(name, codes, octave_steps(table.master_steps[name], k), axis))
    return out


def plan_table_bytes(table: PlanTable) -> bytes:
    """The table as safetensors bytes with the scalars in its metadata."""
    tensors: dict[str, np.ndarray] = {"int8": table.int8.astype(np.uint8),
                                      "nbits_block": table.nbits_block.astype(np.uint16),
                                      "kept_share": table.kept_share.astype(np.float64)}
    for name in table.tensors:
        tensors[f"steps/{name}"] = table.master_steps[name].astype(np.float32)
        tensors[f"octaves/{name}"] = table.octaves[name].astype(np.uint8)
    meta: dict[str, str] = {"format": FORMAT, "master_scale": repr(table.master_scale),
                            "prune_grid": json.dumps(list(table.prune_grid)),
                            "points": json.dumps([list(p) for p in table.points]),
                            "tensors": json.dumps(list(table.tensors)), "out_axes": json.dumps(list(table.out_axes))}
    # one metadata key: safetensors writes a metadata map in per-process hash order, and a bundle's
    # bytes must not depend on the process that packed it
    return save(tensors, metadata={"toco": json.dumps(meta, sort_keys=True)})


def save_plan_table(table: PlanTable, path: Path) -> None:
    """Write the table (plan_table_bytes) to ``path``."""
    Path(path).write_bytes(plan_table_bytes(table))


def plan_table_from_bytes(data: bytes) -> PlanTable:
    """Parse a table written by save_plan_table. Raises AnalysisError when malformed."""
    try:
        # safetensors: 8-byte little-endian header length, then the JSON header with __metadata__
        meta = json.loads(json.loads(bytes(data[8:8 + int.from_bytes(data[:8], "little")]))["__metadata__"]["toco"])
        raw = load(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        tensors = tuple(json.loads(meta["tensors"]))
        table = PlanTable(
            master_scale=float(meta["master_scale"]), prune_grid=tuple(json.loads(meta["prune_grid"])),
            points=tuple(tuple(p) for p in json.loads(meta["points"])), tensors=tensors,
            out_axes=tuple(json.loads(meta["out_axes"])),
            master_steps={t: raw[f"steps/{t}"] for t in tensors}, octaves={t: raw[f"octaves/{t}"] for t in tensors},
            int8=raw["int8"].astype(bool), nbits_block=raw["nbits_block"], kept_share=raw["kept_share"])
    except Exception as exc:  # safetensors, json and key errors all mean the same to a user
        raise AnalysisError(f"the plan table is unreadable: {type(exc).__name__}: {exc}",
                            "re-run the analysis or fetch the bundle again") from None
    for t in tensors:
        if not nested_steps_ok(table.master_steps[t]) or table.octaves[t].shape[0] != len(table.points):
            raise AnalysisError(f"the plan table's entry for {t!r} is inconsistent", "re-run the analysis")
    return table


def load_plan_table(path: Path) -> PlanTable:
    """Read a table file. Raises AnalysisError when missing or malformed."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AnalysisError(f"cannot read the plan table {path}: {exc}", "re-run the analysis") from None
    return plan_table_from_bytes(data)
