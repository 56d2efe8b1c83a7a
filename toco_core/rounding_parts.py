"""Rounding parts: each calibrated point's compensated code differences, so a box builds the
codes the server measured without the fp32 weights or the layer inputs.

With compensated rounding (toco_core.compression.compensated_rounding) a point's codes are its
nested codes (toco_core.plan_table.plan_codes) plus small per-weight differences, which depend
on the fp32 weights and the analysis samples. The analysis encodes each point's differences once,
as the part ``round/{i}`` a box fetches for its plan (PointRounding holds these bytes: LeNet-5's
91 points are 0.5 MB encoded, 11 MB as int16 arrays, which a 1.57M-weight model's analysis could
not keep in memory). The analysis directory keeps them all in OUT/rounding.parts.

A part: the names of the weights that differ, then over their differences flattened in that
order a bitmask of the non-zero ones, a bitmask of which of those are negative, and |d| - 1 of
each (mostly 0), under LZMA. Differences are mostly 0 and +-1, so the masks carry nearly all of it,
8x denser than int8 bytes: LZMA of the masks was 15% smaller and 7-10x faster than of the bytes.
"""

from __future__ import annotations

import io
import lzma
from pathlib import Path

import numpy as np

from toco_core.bundle import pack_bundle, unpack_bundle
from toco_core.errors import AnalysisError, BundleError

PointRounding = dict[int, bytes]  # point index -> its encoded part (encode_point)
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def rounding_part_name(i: int) -> str:
    """The part holding point ``i``'s code differences."""
    return f"round/{i}"


def encode_point(differences: dict[str, np.ndarray]) -> bytes:
    """One point's part from its differences (weight name -> integer array, any shape).

    Raises ValueError for a difference of more than 65,536 steps.
    """
    names = sorted(differences)
    flat = np.concatenate([np.asarray(differences[n]).ravel() for n in names]) if names else np.zeros(0, np.int64)
    values = flat[flat != 0].astype(np.int64)
    excess = np.abs(values) - 1
    if excess.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"a compensated code moved {int(excess.max()) + 1} steps from its nested code")
    arrays = {"names": np.frombuffer("\n".join(names).encode(), np.uint8), "size": np.asarray([flat.size], np.int64),
              "nonzero": np.packbits(flat != 0), "negative": np.packbits(values < 0),
              "excess": excess.astype(np.uint8 if excess.max(initial=0) <= 255 else np.uint16)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    # a dictionary the size of the input: preset 6's 8 MB took 3x the time on LeNet-5's 20 KB parts;
    # the decoder's (preset 6) is larger, which LZMA allows
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{**_FILTERS[0], "dict_size": max(len(raw), 4096)}])


def decode_point(data: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of encode_point: int16 differences in the shapes of their weights (``shapes``).

    Raises ValueError when the part does not decode, names a weight ``shapes`` lacks, or its
    differences do not fill the weights it names.
    """
    try:
        with np.load(io.BytesIO(lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_FILTERS)),
                     allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("names", "size", "nonzero", "negative", "excess")}
    except (lzma.LZMAError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"the part does not decode: {exc}") from None
    names = bytes(arrays["names"]).decode().split("\n") if arrays["names"].size else []
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"the part names weights the graph lacks: {unknown}")
    sizes = [int(np.prod(shapes[n])) for n in names]
    size = int(arrays["size"][0])
    nonzero = np.unpackbits(arrays["nonzero"], count=size).astype(bool) if size else np.zeros(0, bool)
    count = int(nonzero.sum())
    if size != sum(sizes) or arrays["excess"].shape != (count,):
        raise ValueError(f"{size} differences ({count} non-zero) for weights that hold {sum(sizes)}")
    sign = np.where(np.unpackbits(arrays["negative"], count=count).astype(bool), -1, 1)
    flat = np.zeros(size, np.int64)
    flat[nonzero] = sign * (arrays["excess"].astype(np.int64) + 1)
    ends = np.cumsum(sizes)
    return {n: flat[e - k:e].astype(np.int16).reshape(shapes[n]) for n, k, e in zip(names, sizes, ends, strict=True)}


def rounding_parts_of(points: int, rounding: PointRounding | None) -> dict[str, bytes]:
    """Part name -> bytes for every one of a plan table's ``points``.

    Raises AnalysisError when the analysis lacks a point's differences (a box could not build it).
    """
    missing = [i for i in range(points) if rounding is None or i not in rounding]
    if missing or rounding is None:
        raise AnalysisError(f"the analysis compensated its rounding but lacks the code differences of "
                            f"{len(missing)} of its {points} points", "re-run the analysis")
    return {rounding_part_name(i): rounding[i] for i in range(points)}


def save_point_rounding(rounding: PointRounding, path: Path) -> None:
    """Write every point's part (the analysis' copy, which format-1 bundles carry) in one container."""
    Path(path).write_bytes(pack_bundle({rounding_part_name(i): d for i, d in sorted(rounding.items())}
                                       or {"none": b""}))


def load_point_rounding(path: Path) -> PointRounding:
    """Read what save_point_rounding wrote. Raises AnalysisError when the file is unreadable."""
    try:
        files = unpack_bundle(Path(path).read_bytes())
        return {int(name.split("/", 1)[1]): data for name, data in files.items() if name.startswith("round/")}
    except (BundleError, OSError, ValueError) as exc:
        raise AnalysisError(f"the rounding differences {path} are unreadable: {exc}", "re-run the analysis") from None
