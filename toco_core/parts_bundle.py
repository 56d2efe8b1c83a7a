"""Parts bundles: a bundle whose bytes follow the tolerances, fetched by the parts a plan needs.

Parts (each a file of the signed container of toco_core.bundle, so the manifest carries the
SHA-256 of every part):

    head               LZMA of an inner container: the graph without its compressible weights,
                       the plan table, the analysis manifest and curves, bundle.json and the
                       code layout (ladder.json)
    prune/{j}          j = G-1 .. 0: among the weights of class <= j + 1, those of class <= j
    band/{c}           the master codes of the weights of prune class c, down to each tensor's
                       top bit (the finest every point reads), and fine/{c}/{b} their bit b
                       below it (toco_core.weight_bands)
    bias/{j}, bias/none the corrected biases of the points pruned at level j / not pruned
                       (toco_core.bias_parts)
    round/{i}          point i's compensated code differences (toco_core.rounding_parts; only
                       for an analysis with compensated rounding)
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
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx

from toco_core.analysis_result import AnalysisManifest, AnalysisResult
from toco_core.bias_parts import bias_arrays, bias_part_name, bias_parts_of, deltas_from_arrays
from toco_core.bundle import BundleManifest, pack_bundle, unpack_bundle
from toco_core.calibration import PLANNED, CalibrationCurve
from toco_core.compression import plane_coding as planes
from toco_core.compression.nested import channel_axis_shape, octave_steps, prune_level
from toco_core.compression.storage import QuantizedTensor, _strip
from toco_core.errors import BundleError
from toco_core.fidelity import OutputKind, as_log_probs
from toco_core.model_bundle import BundleInfo
from toco_core.model_inputs import from_arrays, to_arrays
from toco_core.onnx_model import compressible_weights, load_model, model_bytes, with_weights
from toco_core.plan import CompressionPlan
from toco_core.plan_build import fit_point_deltas
from toco_core.plan_table import plan_table_bytes, plan_table_from_bytes
from toco_core.rounding_parts import PointRounding, rounding_part_name, rounding_parts_of
from toco_core.runtime_forms import cost_curves, range_samples_needed, runtime_form
from toco_core.sample_codec import decode_samples, encode_samples, self_test_samples
from toco_core.task_kind import CLASSIFIER, TaskKind, TaskSpec
from toco_core.weight_bands import band_names, band_parts, decode_bands, normalized_bounds
from toco_core.weight_planes import (
    LadderLayout,
    classes_from_planes,
    ladders_from_planes,
    layout_top_bits,
    lowest_bits,
    plane_names,
    shared_top_bits,
    top_codes,
    weight_parts,
)
from toco_core.weight_source import WeightSource, from_base_model, require_plans

FORMAT = 2  # bundle.json's parts format; 1 is the fp32 model + analysis directory
_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


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
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy: **kwds may name allow_pickle
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


def compact_outputs(out: np.ndarray, kind: OutputKind, task: TaskSpec = CLASSIFIER) -> np.ndarray:
    """The base outputs as the self-test needs them: float16 where that keeps every sample's
    predicted class (the gate counts disagreements; checked here, on these very outputs), else
    as they are. Halves them (8.5 KB of LeNet-5's 500 self-test samples); the reported KL moves
    by rounding of 2^-11 of a logit. Other task kinds keep them as they are: their metrics
    compare the values themselves, and rounding would move samples across the tolerance."""
    if task.kind is not TaskKind.CLASSIFIER:
        return out
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


def pack_parts(model: onnx.ModelProto, result: AnalysisResult, info: BundleInfo, budget: float | None = None,
               include_base: bool = False, planes_layout: Literal["band", "tensor"] = "band",
               band_bounds: Sequence[int] | None = None) -> dict[str, bytes]:
    """Every part of the bundle of ``model`` and its analysis (see module doc).

    Takes the fp32 base, its analysis (with a plan table), the bundle info, the fleet budget the
    self-test samples are sized for (default: the info's), whether to add the fp32 base, the
    weights' layout (``tensor``: bit planes of all weights, as bundles were packed before bands)
    and the bands' group bounds (prune grid levels; default every level: see weight_bands).
    Raises AnalysisError for an analysis of another model or without a plan table, ValueError for
    bounds off the prune grid.
    """
    source = from_base_model(model, result)
    table = require_plans(result)
    infos = compressible_weights(model)
    top_bits = shared_top_bits(table)
    by_name = {i.name: i for i in infos}
    layout = LadderLayout(tensors=list(table.tensors), shapes=[list(by_name[n].shape) for n in table.tensors],
                          out_axes=list(table.out_axes), top_octave=max(top_bits, default=0) + 1, top_bits=top_bits,
                          prune_levels=len(table.prune_grid), prune_context_bit=0, bias_parts=result.bias_correction,
                          rounding_parts=True if result.compensated_rounding else None,
                          prune_tree="chain", plane_parts="band",
                          band_bounds=None if band_bounds is None else
                          normalized_bounds(band_bounds, len(table.prune_grid)))
    if planes_layout == "band":
        masters = [m for n in table.tensors if (m := source.ladders[n].master) is not None]
        if len(masters) != len(table.tensors):
            raise ValueError("writing the weight bands needs every tensor's master codes")
        parts = band_parts(masters, [source.classes[n] for n in table.tensors], len(table.prune_grid), top_bits,
                           layout.band_bounds)
    else:  # the layout of bundles packed before bands (kept to test that they still open)
        parts, top, _, node_bits = weight_parts(source.ladders, source.classes, table)
        layout = layout.model_copy(update={"top_octave": top, "prune_tree": "balanced", "plane_parts": "tensor",
                                           "prune_node_bits": node_bits})
    graph = _strip(model, [QuantizedTensor(n, np.zeros(by_name[n].shape, np.int32), table.master_steps[n],
                                           by_name[n].out_axis) for n in table.tensors])
    head = {"graph.onnx": model_bytes(graph), "plans.safetensors": plan_table_bytes(table),
            # a box plans from the planned curves and the int8 cost; the master sweep and the per-round
            # and per-tensor summaries stay on the server (0.7 KB of LeNet-5's 11.8 KB head)
            "analysis/manifest.json": result.manifest.model_copy(update={"rounds": [], "tensors": []})
            .model_dump_json().encode(),
            "analysis/calibration.json": json.dumps({k: c.model_dump() for k, c in result.curves.items()
                                                     if k in (*PLANNED, *cost_curves())}).encode(),
            "bundle.json": info.model_copy(update={"format": FORMAT}).model_dump_json().encode(),
            # without unset keys: agents from before band bounds open a bundle laid out with every level a bound
            "ladder.json": layout.model_dump_json(exclude_none=True).encode()}
    parts["head"] = _lz(pack_bundle(head))
    for name, points in bias_parts_of(table, fit_point_deltas(source, result)).items():
        parts[name] = encode_arrays(bias_arrays(points))
    if result.compensated_rounding:
        parts.update(rounding_parts_of(len(table.points), result.rounding))
    n_test = min(len(result.heldout_x), self_test_samples(budget or info.budget))
    held = {**to_arrays("x", result.heldout_x[:n_test]),
            "base_out": compact_outputs(source.base_out[:n_test], result.manifest.output_kind,
                                                          result.task)}
    if result.heldout_y is not None:
        held["y"] = result.heldout_y[:n_test]
    parts["calib/heldout"] = encode_calibration(held)
    n_analysis = range_samples_needed(result.curves)
    if n_analysis:
        parts["calib/analysis"] = encode_calibration(to_arrays("x", result.analysis_x[:n_analysis]))
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
            raise BundleError(f"the bundle head is malformed: {exc}",
                              "re-pack the bundle on the fleet server") from None
        self.table = plan_table_from_bytes(files["plans.safetensors"])
        means = decode_arrays(files["means.npz"], "head/means.npz") if "means.npz" in files else None
        self.base_means = None if means is None else [means[f"m{k}"] for k in range(len(means))]

    @property
    def bias_correction(self) -> bool:
        """Whether plans are built with bias correction (so the correction samples are needed)."""
        return bool(self.manifest.settings.get("bias_correction", False))

    @property
    def always(self) -> list[str]:
        """The parts every plan reads: the head, the self-test samples and, in the bit-plane layouts,
        the top codes."""
        return ["head", "calib/heldout"] + ([] if self.layout.plane_parts == "band" else ["codes/top"])

    def parts_for_plan(self, plan: CompressionPlan) -> list[str]:
        """The parts a box needs to build ``plan``: head, the prune planes down to its level, the
        weight codes down to its finest octave (in the band layout: of the classes it keeps only),
        the self-test samples, its point's bias part where plans correct biases and its rounding
        part where the analysis compensated (the correction
        samples in bundles packed before bias parts), the int8 range samples where it runs int8.
        The base plan needs every weight plane."""
        names = self.always
        level, bits = -1, [0] * len(self.layout.tensors)
        if plan.prune_scale > 0 or plan.quant_scale > 0:
            i = self.table.point_index(plan.prune_scale, plan.quant_scale)
            bits = lowest_bits(self.table, i)
            level = prune_level(self.table.prune_grid, plan.prune_scale)
            if level >= 0 and self.layout.plane_parts != "band":
                names += [f"prune/{t}" for _, _, t in planes.prune_path(self.layout.prune_levels, level,
                                                                         self.layout.prune_tree)]
            if self.bias_correction and self.layout.bias_parts:
                names.append(bias_part_name(self.table, i))
            if self.layout.rounding_parts:
                names.append(rounding_part_name(i))
            if (self.bias_correction and not self.layout.bias_parts) or runtime_form(plan.runtime).range_samples > 0:
                names.append("calib/analysis")
        if self.layout.plane_parts == "band":
            return names + band_names(self.layout.prune_levels, level, bits, layout_top_bits(self.layout),
                                      self.layout.band_bounds)
        return names + plane_names(self.layout, bits)


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


def _point_rounding(head: BundleHead, parts: dict[str, bytes]) -> PointRounding | None:
    """The encoded code differences of every rounding part present (None for a bundle without them;
    decoded, and checked against the graph, when a build reads them)."""
    if not head.layout.rounding_parts:
        return None
    return {int(n.split("/", 1)[1]): data for n, data in parts.items() if n.startswith("round/")}


def source_from_parts(parts: dict[str, bytes]) -> tuple[WeightSource, AnalysisResult, BundleInfo]:
    """A box's WeightSource, analysis and bundle info from the parts it holds (at least
    BundleHead.always). With the ``base`` part the fp32 base is the reference.

    The reference model is the graph with each weight at the finest octave the parts reach (the
    master when all refinements are present): dense fp32 like the base, so p50 and RSS gates hold.
    Raises BundleError naming the missing or damaged part.
    """
    head = BundleHead(parts["head"]) if "head" in parts else None
    missing = [n for n in (head.always if head else ["head", "calib/heldout"]) if n not in parts]
    if head is None or missing:
        raise BundleError(f"the bundle parts lack {', '.join(missing)}", "fetch them from the fleet server")
    held = decode_calibration(parts["calib/heldout"], "calib/heldout")
    hx = from_arrays("x", held)
    ax = from_arrays("x", decode_calibration(parts["calib/analysis"], "calib/analysis")) \
        if "calib/analysis" in parts else hx[:0]
    result = AnalysisResult(head.manifest, None, head.curves, ax, hx, held.get("y"), plans=head.table)
    lay = head.layout
    if lay.plane_parts == "band":
        ladder_list, class_list = decode_bands(lay.shapes, lay.out_axes, parts, lay.prune_levels, layout_top_bits(lay),
                                                lay.band_bounds)
        ladders = dict(zip(lay.tensors, ladder_list, strict=True))
        classes = dict(zip(lay.tensors, class_list, strict=True))
    else:
        ladders = ladders_from_planes(lay, parts, top_codes(lay, parts))
        classes = classes_from_planes(lay, parts, ladders)
    if "base" in parts:
        source = from_base_model(load_model(parts["base"]), result, classes)
        return dataclasses.replace(source, point_deltas=_point_deltas(head, parts),
                                   point_rounding=_point_rounding(head, parts)), result, head.info
    values = {}
    for n, a in zip(head.layout.tensors, head.layout.out_axes, strict=True):
        finest = np.full(ladders[n].shape[a], ladders[n].finest)
        codes = ladders[n].codes(finest).astype(np.float32)
        values[n] = codes * octave_steps(head.table.master_steps[n], finest).reshape(channel_axis_shape(codes.ndim, a))
    reference = with_weights(head.graph, values)
    source = WeightSource(reference, False, ladders, classes, held["base_out"].astype(np.float32), head.base_means,
                          _point_deltas(head, parts), _point_rounding(head, parts))
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
