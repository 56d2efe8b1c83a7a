"""Rounding parts: each calibrated point's compensated code differences, so a box builds the
codes the server measured without the fp32 weights or the layer inputs.

With compensated rounding (toco_core.compression.compensated_rounding) a point's codes are its
nested codes (toco_core.plan_table.plan_codes) plus small per-weight differences, which depend
on the fp32 weights and the analysis samples. The server computes them once per point; a box
fetches the part of its point, ``round/{i}``, and adds them (mostly 0 and +-1: under LZMA a few
KB for LeNet-5). The analysis keeps every point's differences in OUT/rounding.safetensors.xz.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from toco_core.errors import AnalysisError

PointRounding = dict[int, dict[str, np.ndarray]]  # point index -> {weight: int16 code differences}


def rounding_part_name(i: int) -> str:
    """The part holding point ``i``'s code differences."""
    return f"round/{i}"


def rounding_parts_of(points: int, rounding: PointRounding | None) -> dict[str, dict[str, np.ndarray]]:
    """Part name -> code differences for every one of a plan table's ``points``.

    Raises AnalysisError when the analysis lacks a point's differences (a box could not build it).
    """
    missing = [i for i in range(points) if rounding is None or i not in rounding]
    if missing:
        raise AnalysisError(f"the analysis compensated its rounding but lacks the code differences of "
                            f"{len(missing)} of its {points} points", "re-run the analysis")
    assert rounding is not None
    return {rounding_part_name(i): rounding[i] for i in range(points)}


def rounding_arrays(differences: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of one point's part: ``names`` (the weights that differ, '\\n'-joined, as uint8)
    and ``codes`` (their differences flattened in that order, int8 where they fit, else int16)."""
    names = sorted(differences)
    flat = [np.asarray(differences[n]).ravel() for n in names]
    codes = np.concatenate(flat) if flat else np.zeros(0, np.int16)
    small = np.abs(codes).max(initial=0) <= np.iinfo(np.int8).max
    return {"names": np.frombuffer("\n".join(names).encode(), np.uint8),
            "codes": codes.astype(np.int8 if small else np.int16)}


def differences_from_arrays(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of rounding_arrays, each difference in its weight's shape (``shapes``).

    Raises ValueError when the part names an unknown weight or its codes do not fill the weights,
    KeyError when an array is missing.
    """
    names = bytes(arrays["names"]).decode().split("\n") if arrays["names"].size else []
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"the part names weights the graph lacks: {unknown}")
    codes = arrays["codes"]
    sizes = [int(np.prod(shapes[n])) for n in names]
    if codes.dtype not in (np.int8, np.int16) or codes.shape != (sum(sizes),):
        raise ValueError(f"{codes.size} {codes.dtype} code differences; the weights it names need {sum(sizes)}")
    ends = np.cumsum(sizes)
    return {n: codes[e - k:e].astype(np.int16).reshape(shapes[n]) for n, k, e in zip(names, sizes, ends, strict=True)}


def save_point_rounding(rounding: PointRounding, path: Path) -> None:
    """Write every point's differences (the analysis' copy, which format-1 bundles carry): tensor
    ``{i}/{weight}`` = int8 array (int16 where a difference needs it) in safetensors, under LZMA
    preset 1 (mostly zeros: LeNet-5's 91 points are 5.6 MB raw, 0.5 MB packed in 0.1 s; the default
    preset 6 saved 0.2 MB for 1.6 s of every analysis)."""
    arrays = {f"{i}/{n}": np.ascontiguousarray(d, np.int8 if np.abs(d).max(initial=0) <= 127 else np.int16)
              for i, point in rounding.items() for n, d in point.items()}
    data = save(arrays, metadata={"points": ",".join(str(i) for i in sorted(rounding))})
    Path(path).write_bytes(lzma.compress(data, preset=1))


def load_point_rounding(path: Path) -> PointRounding:
    """Read what save_point_rounding wrote (points whose codes did not change included, empty).

    Raises AnalysisError when the file is unreadable.
    """
    try:
        data = lzma.decompress(Path(path).read_bytes())
        listed = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {}).get("points", "")
        out: PointRounding = {int(i): {} for i in listed.split(",") if i}
        for key, value in load(data).items():
            i, name = key.split("/", 1)
            out.setdefault(int(i), {})[name] = value.astype(np.int16)
        return out
    except Exception as exc:  # safetensors, key and value errors all mean the same to a user
        raise AnalysisError(f"the rounding differences {path} are unreadable: {type(exc).__name__}: {exc}",
                            "re-run the analysis") from None
