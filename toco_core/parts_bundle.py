"""Parts bundles: a bundle whose bytes follow the tolerances, fetched by the parts a plan needs.

Parts (each a file of the signed container of toco_core.bundle, so the manifest carries the
SHA-256 of every part):

    head               LZMA of an inner container: the graph without its compressible weights,
                       the plan table, the analysis manifest and curves, bundle.json and the
                       code layout (ladder.json)
    prune/{t}          the prune tree's split at grid level t (toco_core.compression.plane_coding)
    codes/top          every weight's sign(q) (|q| >> B), B = T - 1 for the top octave T
    codes/{b}/{k}      bit plane b of tensor k's |q| (b = B-1 .. 0): octave k needs the planes
                       down to k - 1
    bias/{j}, bias/none the corrected biases of the points pruned at level j / not pruned
                       (toco_core.bias_parts)
    calib/heldout      self-test samples, the base model's outputs on them (and labels)
    calib/analysis     int8 activation-range samples (int8 plans only)
    base               the fp32 model (optional)

A box reads ``head``, plans (toco_core.solver), fetches ``parts_for_plan`` and builds with
``source_from_parts``: the same weights and biases as the server's build of that plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma

import numpy as np
import onnx
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from toco_core.analysis_result import AnalysisManifest, AnalysisResult
from toco_core.bias_parts import bias_arrays, bias_part_name, bias_parts_of, deltas_from_arrays
from toco_core.bundle import BundleManifest, pack_bundle, unpack_bundle
from toco_core.calibration import INT8_CALIBRATION_SAMPLES, PLANNED, CalibrationCurve
from toco_core.compression import plane_coding as planes
from toco_core.compression.nested import CodeLadder, channel_axis_shape, octave_steps
from toco_core.compression.storage import QuantizedTensor, _strip
from toco_core.errors import BundleError
from toco_core.fidelity import OutputKind, as_log_probs
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import compressible_weights, load_model, model_bytes, with_weights
from toco_core.plan import CompressionPlan
from toco_core.plan_table import PlanTable, plan_table_bytes, plan_table_from_bytes
from toco_core.recompress import fit_point_deltas
from toco_core.sample_codec import decode_samples, encode_samples, self_test_samples
from toco_core.weight_source import WeightSource, from_base_model, require_plans

FORMAT = 2  # bundle.json's parts format; 1 is the fp32 model + analysis directory
_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


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


def _lz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{**_LZMA[0], "dict_size": max(len(data), 4096)}])


def _unlz(data: bytes, what: str) -> bytes:
    try:
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA)
    except lzma.LZMAError as exc:
        raise BundleError(f"bundle part {what} does not decompress: {exc}", "fetch the bundle again") from None


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays, losslessly: npz (no pickle) under LZMA."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _lz(buf.getvalue())


def decode_arrays(data: bytes, what: str) -> dict[str, np.ndarray]:
    """Inverse of encode_arrays. Raises BundleError naming the part when it does not decode."""
    try:
        with np.load(io.BytesIO(_unlz(data, what)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, KeyError) as exc:
        raise BundleError(f"bundle part {what} is unreadable: {exc}", "fetch the bundle again") from None


def encode_calibration(arrays: dict[str, np.ndarray]) -> bytes:
    """Named calibration arrays, each in its native dtype and range, losslessly
    (toco_core.sample_codec), in one container."""
    return pack_bundle({name: encode_samples(a) for name, a in arrays.items()})


def decode_calibration(data: bytes, what: str) -> dict[str, np.ndarray]:
    """Inverse of encode_calibration. Raises BundleError naming the part when it does not decode."""
    try:
        return {name: decode_samples(blob) for name, blob in unpack_bundle(data).items()}
    except BundleError as exc:
        raise BundleError(f"bundle part {what}: {exc.message}", exc.hint) from None


def _rows(codes: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def _truncate(q: np.ndarray, b: int) -> np.ndarray:
    """sign(q) * (|q| >> b): the codes known down to bit b."""
    return (np.sign(q) * np.right_shift(np.abs(q.astype(np.int64)), b)).astype(np.int32)


def lowest_bits(table: PlanTable, i: int) -> list[int]:
    """Per tensor, the finest bit plane point ``i`` needs: octave k reads |q| down to bit k - 1
    (octave 0: bit 0), so the tensor's finest channel octave decides."""
    return [max(int(table.octaves[t][i].min()) - 1, 0) if table.octaves[t].shape[1] else 0 for t in table.tensors]


def compact_outputs(out: np.ndarray, kind: OutputKind) -> np.ndarray:
    """The base outputs as the self-test needs them: float16 where that keeps every sample's
    predicted class (the gate counts disagreements; checked here, on these very outputs), else
    as they are. Halves them (8.5 KB of LeNet-5's 500 self-test samples); the reported KL moves
    by rounding of 2^-11 of a logit."""
    half = out.astype(np.float16)
    if out.dtype == np.float32 and np.isfinite(half).all() and np.array_equal(
            as_log_probs(half.astype(np.float32), kind).argmax(-1), as_log_probs(out, kind).argmax(-1)):
        return half
    return out


def _graph_shapes(graph: onnx.ModelProto, stripped: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the float initializers the head's graph holds (biases among them), but for the
    ``stripped`` compressible weights, which travel as codes."""
    return {t.name: tuple(t.dims) for t in graph.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and t.name not in stripped}


def _weight_parts(ladders: dict[str, CodeLadder], classes: dict[str, np.ndarray],
                  table: PlanTable) -> tuple[dict[str, bytes], int, list[int]]:
    """codes/top, codes/{b}/{k} (bit plane b of tensor k) and prune/{t} (a balanced prune tree) of
    the master codes; returns them, the top octave and per tensor the prune context bit (the
    coarsest bit every pruning point reads of that tensor anyway)."""
    names = list(table.tensors)
    top = max([int(table.octaves[n].max(initial=0)) for n in names] + [0])
    axes = dict(zip(names, table.out_axes))
    masters = [ladders[n].master for n in names]
    top_codes = [_truncate(q, max(top - 1, 0)) for q in masters]
    parts = {"codes/top": planes.encode_top([_rows(c, axes[n]) for c, n in zip(top_codes, names)])}
    # a plane per tensor: a point's channels of one layer often need a finer octave than the rest
    # (LeNet-5's handheld: 9 channels of one layer at octave 3, every other at 4 or coarser)
    for b in range(max(top - 1, 0) - 1, -1, -1):
        for k, q in enumerate(masters):
            parts[f"codes/{b}/{k}"] = planes.encode_bit_plane([q], b)
    pruning = [lowest_bits(table, i) for i, (p, _) in enumerate(table.points) if p > 0]
    context_bits = [max([bits[k] for bits in pruning] + [0]) for k in range(len(names))]
    coarse = [_truncate(q, cb) for q, cb in zip(masters, context_bits)]
    for node in planes.prune_tree(len(table.prune_grid), "balanced"):
        parts[f"prune/{node[2]}"] = planes.encode_prune_plane([classes[n] for n in names], coarse, node)
    return parts, top, context_bits


def pack_parts(model: onnx.ModelProto, result: AnalysisResult, info: BundleInfo, budget: float | None = None,
               include_base: bool = False) -> dict[str, bytes]:
    """Every part of the bundle of ``model`` and its analysis (see module doc).

    Takes the fp32 base, its analysis (with a plan table), the bundle info, the fleet budget the
    self-test samples are sized for (default: the info's) and whether to add the fp32 base.
    Raises AnalysisError for an analysis of another model or without a plan table.
    """
    source = from_base_model(model, result)
    table = require_plans(result)
    infos = compressible_weights(model)
    parts, top, context_bits = _weight_parts(source.ladders, source.classes, table)
    by_name = {i.name: i for i in infos}
    layout = LadderLayout(tensors=list(table.tensors), shapes=[list(by_name[n].shape) for n in table.tensors],
                          out_axes=list(table.out_axes), top_octave=top, prune_levels=len(table.prune_grid),
                          prune_context_bit=max(context_bits + [0]), prune_context_bits=context_bits,
                          bias_parts=result.bias_correction, prune_tree="balanced", plane_parts="tensor")
    graph = _strip(model, [QuantizedTensor(n, np.zeros(by_name[n].shape, np.int32), table.master_steps[n],
                                           by_name[n].out_axis) for n in table.tensors])
    head = {"graph.onnx": model_bytes(graph), "plans.safetensors": plan_table_bytes(table),
            # a box plans from the planned curves and the int8 cost; the master sweep and the per-round
            # and per-tensor summaries stay on the server (0.7 KB of LeNet-5's 11.8 KB head)
            "analysis/manifest.json": result.manifest.model_copy(update={"rounds": [], "tensors": []})
            .model_dump_json().encode(),
            "analysis/calibration.json": json.dumps({k: c.model_dump() for k, c in result.curves.items()
                                                     if k in (*PLANNED, "int8")}).encode(),
            "bundle.json": info.model_copy(update={"format": FORMAT}).model_dump_json().encode(),
            "ladder.json": layout.model_dump_json().encode()}
    parts["head"] = _lz(pack_bundle(head))
    for name, points in bias_parts_of(table, fit_point_deltas(source, result)).items():
        parts[name] = encode_arrays(bias_arrays(points))
    n_test = min(len(result.heldout_x), self_test_samples(budget or info.budget))
    held = {"x": result.heldout_x[:n_test], "base_out": compact_outputs(source.base_out[:n_test],
                                                                        result.manifest.output_kind)}
    if result.heldout_y is not None:
        held["y"] = result.heldout_y[:n_test]
    parts["calib/heldout"] = encode_calibration(held)
    n_analysis = INT8_CALIBRATION_SAMPLES if "int8" in result.curves else 0
    if n_analysis:
        parts["calib/analysis"] = encode_calibration({"x": result.analysis_x[:n_analysis]})
    if include_base:
        parts["base"] = model_bytes(model)
    return parts


class BundleHead:
    """The ``head`` part opened: what a box plans with before it fetches any weight plane."""

    def __init__(self, data: bytes) -> None:
        """Raises BundleError when the head is damaged or is not a parts bundle's."""
        files = unpack_bundle(_unlz(data, "head"))
        needed = ("graph.onnx", "plans.safetensors", "analysis/manifest.json", "analysis/calibration.json",
                  "bundle.json", "ladder.json")
        missing = [n for n in needed if n not in files]
        if missing:
            raise BundleError(f"the bundle head lacks {', '.join(missing)}", "re-pack the bundle on the fleet server")
        try:
            self.info = BundleInfo.model_validate_json(files["bundle.json"])
            self.layout = LadderLayout.model_validate_json(files["ladder.json"])
            self.manifest = AnalysisManifest.model_validate_json(files["analysis/manifest.json"])
            self.curves = {k: CalibrationCurve.model_validate(v)
                           for k, v in json.loads(files["analysis/calibration.json"]).items()}
            self.graph = onnx.load_from_string(files["graph.onnx"])
        except (ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            raise BundleError(f"the bundle head is malformed: {exc}", "re-pack the bundle on the fleet server") from None
        self.table = plan_table_from_bytes(files["plans.safetensors"])
        means = decode_arrays(files["means.npz"], "head/means.npz") if "means.npz" in files else None
        self.base_means = None if means is None else [means[f"m{k}"] for k in range(len(means))]

    @property
    def bias_correction(self) -> bool:
        """Whether plans are built with bias correction (so the correction samples are needed)."""
        return bool(self.manifest.settings.get("bias_correction", False))

    def parts_for_plan(self, plan: CompressionPlan) -> list[str]:
        """The parts a box needs to build ``plan``: head, the prune planes down to its level, the
        weight planes down to its finest octave, the self-test samples, its point's bias part where
        plans correct biases (the correction samples in bundles packed before bias parts), the
        int8 range samples where it runs int8. The base plan needs every weight plane."""
        names = ["head", "codes/top", "calib/heldout"]
        if plan.prune_scale > 0 or plan.quant_scale > 0:
            i = self.table.point_index(plan.prune_scale, plan.quant_scale)
            bits = lowest_bits(self.table, i)
            level = next(j for j, p in enumerate(self.table.prune_grid) if abs(p - plan.prune_scale) <= 1e-9) \
                if plan.prune_scale > 0 else self.layout.prune_levels
            if level < self.layout.prune_levels:
                names += [f"prune/{t}" for _, _, t in planes.prune_path(self.layout.prune_levels, level,
                                                                         self.layout.prune_tree)]
            if self.bias_correction and self.layout.bias_parts:
                names.append(bias_part_name(self.table, i))
            if (self.bias_correction and not self.layout.bias_parts) or plan.runtime == "int8":
                names.append("calib/analysis")
        else:
            bits = [0] * len(self.layout.tensors)
        top_bit = max(self.layout.top_octave - 1, 0)
        if self.layout.plane_parts == "plane":
            return names + [f"codes/{b}" for b in range(top_bit - 1, min(bits + [top_bit]) - 1, -1)]
        return names + [f"codes/{b}/{k}" for k, bit in enumerate(bits) for b in range(top_bit - 1, bit - 1, -1)]


def _top_codes(head: BundleHead, parts: dict[str, bytes]) -> list[np.ndarray]:
    """Every tensor's codes/top codes in its own shape."""
    lay = head.layout
    moved = [(s[a],) + tuple(d for i, d in enumerate(s) if i != a) for s, a in zip(lay.shapes, lay.out_axes)]
    try:
        rows = planes.decode_top(parts["codes/top"], [(m[0], int(np.prod(m[1:]))) for m in moved])
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"the bundle's codes/top part does not decode: {exc}", "fetch the bundle again") from None
    return [np.moveaxis(r.reshape(m), 0, a) for r, m, a in zip(rows, moved, lay.out_axes)]


def _ladders(head: BundleHead, parts: dict[str, bytes], top: list[np.ndarray]) -> dict[str, CodeLadder]:
    """Code ladders from the top codes and, per tensor, the bit planes present contiguously from the top."""
    lay = head.layout
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


def _classes(head: BundleHead, parts: dict[str, bytes], ladders: dict[str, CodeLadder]) -> dict[str, np.ndarray]:
    """Prune classes as far as the prune planes present resolve them: a weight's class is the top
    of its known interval, so pruning at any level the planes resolve (class <= level) reads true.

    Raises BundleError when prune planes are present but the bit planes their contexts need are
    not, or a plane does not decode.
    """
    lay = head.layout
    known = planes.all_unknown([tuple(s) for s in lay.shapes], lay.prune_levels)
    tree = planes.prune_tree(lay.prune_levels, lay.prune_tree)
    if not any(f"prune/{t}" in parts for _, _, t in tree):
        return {n: hi for n, (_, hi) in zip(lay.tensors, known)}
    context = lay.prune_context_bits or [lay.prune_context_bit] * len(lay.tensors)
    if any(ladders[n].bit > c for n, c in zip(lay.tensors, context)):
        raise BundleError(f"prune planes need the weight bit planes down to {context}",
                          "fetch the parts the plan lists")
    top = [_truncate(ladders[n].truncated, c - ladders[n].bit) for n, c in zip(lay.tensors, context)]
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


def _point_deltas(head: BundleHead, parts: dict[str, bytes]) -> dict[int, dict[str, np.ndarray]] | None:
    """The bias deltas of every bias part present (None for a bundle without bias parts)."""
    if not head.layout.bias_parts:
        return None
    shapes, out = _graph_shapes(head.graph, head.table.tensors), {}
    for name in sorted(n for n in parts if n.startswith("bias/")):
        try:
            out.update(deltas_from_arrays(decode_arrays(parts[name], name), shapes))
        except (KeyError, ValueError) as exc:
            raise BundleError(f"bundle part {name} does not fit the graph: {exc}", "fetch the bundle again") from None
    return out


def source_from_parts(parts: dict[str, bytes]) -> tuple[WeightSource, AnalysisResult, BundleInfo]:
    """A box's WeightSource, analysis and bundle info from the parts it holds (at least ``head``,
    ``codes/top`` and ``calib/heldout``). With the ``base`` part the fp32 base is the reference.

    The reference model is the graph with each weight at the finest octave the parts reach (the
    master when all refinements are present): dense fp32 like the base, so p50 and RSS gates hold.
    Raises BundleError naming the missing or damaged part.
    """
    missing = [n for n in ("head", "codes/top", "calib/heldout") if n not in parts]
    if missing:
        raise BundleError(f"the bundle parts lack {', '.join(missing)}", "fetch them from the fleet server")
    head = BundleHead(parts["head"])
    held = decode_calibration(parts["calib/heldout"], "calib/heldout")
    ax = decode_calibration(parts["calib/analysis"], "calib/analysis")["x"] if "calib/analysis" in parts \
        else held["x"][:0]
    result = AnalysisResult(head.manifest, None, head.curves, ax, held["x"], held.get("y"), plans=head.table)
    ladders = _ladders(head, parts, _top_codes(head, parts))
    classes = _classes(head, parts, ladders)
    if "base" in parts:
        source = from_base_model(load_model(parts["base"]), result, classes)
        return dataclasses.replace(source, point_deltas=_point_deltas(head, parts)), result, head.info
    values = {}
    for n, a in zip(head.layout.tensors, head.layout.out_axes):
        finest = np.full(ladders[n].shape[a], ladders[n].finest)
        codes = ladders[n].codes(finest).astype(np.float32)
        values[n] = codes * octave_steps(head.table.master_steps[n], finest).reshape(channel_axis_shape(codes.ndim, a))
    reference = with_weights(head.graph, values)
    source = WeightSource(reference, False, ladders, classes, held["base_out"].astype(np.float32), head.base_means,
                          _point_deltas(head, parts))
    return source, result, head.info


def verify_parts(parts: dict[str, bytes], manifest: BundleManifest) -> None:
    """Check every part against the SHA-256 and size the signed manifest lists for it.

    Raises BundleError naming the first part that is unknown to the manifest, or whose size or
    hash differs (a tampered or damaged part is never decoded).
    """
    listed = {f.name: f for f in manifest.files}
    for name, data in parts.items():
        entry = listed.get(name)
        if entry is None:
            raise BundleError(f"part {name!r} is not in bundle {manifest.bundle_id[:12]}'s manifest",
                              "fetch parts named by the manifest only")
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleError(f"part {name!r} of bundle {manifest.bundle_id[:12]} does not match its signed hash",
                              "it was damaged or tampered with: fetch it again")
