"""Error-compensated rounding (the analysis default) against nearest rounding, at equal steps and
masks, on the LeNet-5 variants of ``bench/compression.py --variants``.

    .venv/bin/python bench/compensated_rounding.py [--budget 0.01] [--headroom 1,2,inf]

For every quantized curve point of a variant's nearest-rounding analysis (``--rounding nearest``'s
cache; the aside variant bn-s4 is left out) the plain codes are the point's nested codes
(toco_core.plan_table.plan_codes, built by toco_core.plan_build.build). The compensated codes keep
each channel's step and the point's prune mask and are rounded by
toco_core.compression.compensated_rounding (GPTQ on the layer's input Hessian from the analysis
samples), with each channel's codes limited to ``headroom`` x its largest plain |code| (the analysis
uses 1; ``inf`` leaves only the coder's limit). The compensated model is bias-corrected as a box
builds it. Both are measured on the calibration half and the unseen digits.

Prints per variant and headroom: unseen flips summed over the points (plain vs compensated), the
storage forms, the per-point difference part (LZMA), and the best plan within budget chosen two ways:
on the calibration half (measurement + 1 SE, as the solver reads a curve) and with the unseen digits
in hand (the oracle). Ratios: fp32 ONNX file / storage form. Writes
bench/results/compensated-rounding.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._common and the checkout's packages

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._common import RESULTS, cached_analysis  # noqa: E402
from bench.compression import VARIANTS, calibration_split, variant_name  # noqa: E402
from toco_core.compression.bias_correction import BiasCorrection  # noqa: E402
from toco_core.compression.compensated_rounding import compensated_many, inverse_factor, layer_hessians  # noqa: E402
from toco_core.compression.nested import prune_level  # noqa: E402
from toco_core.compression.storage import dequantize, encode_model  # noqa: E402
from toco_core.demo.data import mnist_splits  # noqa: E402
from toco_core.demo.train import lenet5_variant  # noqa: E402
from toco_core.onnx_model import compressible_weights, load_model, model_bytes, with_weights  # noqa: E402
from toco_core.plan_build import as_source, build  # noqa: E402
from toco_core.plan_table import plan_codes  # noqa: E402
from toco_core.rounding_parts import encode_point  # noqa: E402
from toco_core.runtime import run_model  # noqa: E402
from toco_core.solver import disagreement_bound, enumerate_plans, is_base_plan  # noqa: E402
from toco_core.weight_source import require_plans  # noqa: E402

console = Console(width=200)


def measure_variant(seed: int, batchnorm: bool, d, headroom: float) -> dict:
    """Plain vs compensated flips and storage at every quantized point of one variant."""
    name = variant_name(seed, batchnorm)
    model = load_model(lenet5_variant(seed, batchnorm))
    settings, suffix = calibration_split(None, None, "nearest")
    result, _ = cached_analysis(name + suffix, model, d.x_pool, d.y_pool, settings)
    infos = compressible_weights(model)
    fp32 = len(model_bytes(model))
    source = as_source(model, result)
    table = require_plans(result)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    factors = {k: inverse_factor(h) for k, h in layer_hessians(model, infos, result.analysis_x).items()}
    correction = BiasCorrection(model, infos, result.analysis_x)
    cal_x, unseen_x = result.heldout_x, d.x_heldout
    tops = (run_model(model, cal_x).argmax(axis=1), run_model(model, unseen_x).argmax(axis=1))

    def flips(m) -> tuple[np.ndarray, np.ndarray]:
        return tuple(run_model(m, x).argmax(axis=1) != top for x, top in zip((cal_x, unseen_x), tops, strict=True))

    points, seen = [], set()
    for plan in enumerate_plans(result, infos, fp32):
        key = (plan.prune_scale, plan.quant_scale)
        if is_base_plan(plan) or plan.quant_scale == 0 or key in seen:
            continue
        seen.add(key)
        plain = plan_codes(table, source.ladders, source.classes, *key)
        level = prune_level(table.prune_grid, plan.prune_scale)
        keeps = {q.name: source.classes[q.name] > level for q in plain}
        comp = [compensated_many(weights[q.name], [q], [keeps[q.name]], factors[q.name], headroom)[0]
                if q.name in factors else q for q in plain]
        values = {q.name: dequantize(q) for q in comp}
        float_model = with_weights(model, {**values, **correction.biases(values)})
        diff = np.concatenate([(c.codes - p.codes).ravel() for c, p in zip(comp, plain, strict=True)])
        built = build(source, result, plan)
        (pc, pu), (cc, cu) = flips(built.runnable), flips(float_model)
        points.append({"prune": key[0], "quant": key[1], "label": plan.label,
                       "plain_storage": len(built.storage), "comp_storage": len(encode_model(float_model, comp)),
                       "diff_part_bytes": len(encode_point({q.name: c.codes - q.codes
                                                            for c, q in zip(comp, plain, strict=True)})),
                       "codes_changed": float((diff != 0).mean()),
                       "plain_cal": float(pc.mean()), "plain_unseen": float(pu.mean()),
                       "comp_cal": float(cc.mean()), "comp_unseen": float(cu.mean())})
    return {"name": name, "fp32_bytes": fp32, "samples": len(cal_x), "points": points}


def best(v: dict, kind: str, by: str, budget: float) -> dict | None:
    """The smallest storage form of ``kind`` (plain/comp) within budget: on the calibration half
    (+1 SE, ``by="cal"``) or on the unseen digits (``by="unseen"``, the oracle)."""
    def ok(p: dict) -> bool:
        if by == "cal":
            return disagreement_bound(p[f"{kind}_cal"], v["samples"]) <= budget
        return p[f"{kind}_unseen"] <= budget
    p = min((p for p in v["points"] if ok(p)), key=lambda p: p[f"{kind}_storage"], default=None)
    return None if p is None else {"label": p["label"], "ratio": v["fp32_bytes"] / p[f"{kind}_storage"],
                                   "unseen": p[f"{kind}_unseen"], "diff_part_bytes": p["diff_part_bytes"]}


def _fmt(b: dict | None) -> str:
    return "none" if b is None else f"{b['ratio']:.1f}x at {b['unseen']:.1%}"


def main() -> None:
    """Measure every variant, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.01, help="top-1 disagreement budget (default 0.01)")
    ap.add_argument("--headroom", default="1", help="comma-separated code-limit factors (default 1, the analysis')")
    args = ap.parse_args()
    t0 = time.perf_counter()
    d = mnist_splits()
    rows = []
    for (seed, bn), headroom in ((v, float(h)) for v in VARIANTS for h in args.headroom.split(",")):
        v = measure_variant(seed, bn, d, headroom)
        v["headroom"] = headroom
        pts = v["points"]
        plain_u, comp_u = sum(p["plain_unseen"] for p in pts), sum(p["comp_unseen"] for p in pts)
        v["summary"] = {
            "points": len(pts), "unseen_flips_cut": 1 - comp_u / plain_u,
            "storage_comp_over_plain_median": float(np.median([p["comp_storage"] / p["plain_storage"] for p in pts])),
            "diff_part_bytes_range": [min(p["diff_part_bytes"] for p in pts), max(p["diff_part_bytes"] for p in pts)],
            **{f"{k}_{by}": best(v, k, by, args.budget) for k in ("plain", "comp") for by in ("cal", "unseen")}}
        rows.append(v)
        console.print(f"{v['name']} (headroom {headroom:g}): {len(pts)} points in {time.perf_counter() - t0:.0f} s")
    t = Table(title=f"Compensated (GPTQ-style) vs plain nested rounding, same steps and prune masks, budget "
                    f"{args.budget:.0%}: ratio = fp32 ONNX file / storage form, disagreement on 1,000 unseen digits")
    for col in ("variant", "headroom", "points", "unseen flips cut", "storage comp / plain (median)",
                "diff part (LZMA)", "plain: chosen on cal +1 SE", "comp: chosen on cal +1 SE", "plain: oracle",
                "comp: oracle"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in rows:
        s = v["summary"]
        lo, hi = s["diff_part_bytes_range"]
        t.add_row(v["name"], f"{v['headroom']:g}", str(s["points"]), f"{s['unseen_flips_cut']:.0%}",
                  f"{s['storage_comp_over_plain_median']:.3f}", f"{lo / 1024:.1f}-{hi / 1024:.1f} KiB",
                  _fmt(s["plain_cal"]), _fmt(s["comp_cal"]), _fmt(s["plain_unseen"]), _fmt(s["comp_unseen"]))
    console.print(t)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "compensated-rounding.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "budget": args.budget,
                               "seconds": time.perf_counter() - t0, "variants": rows}, indent=1))
    console.print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
