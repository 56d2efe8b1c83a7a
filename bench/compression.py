"""Compression benchmark: TOCO's device-aware recompression against onnxruntime's quantizers and
magnitude pruning, on the demo CNN, the MLP and a ~5M-parameter CNN.

    .venv/bin/python bench/compression.py [--quick] [--models lenet5,mlp,large] [--reanalyze] [--heldout-share S]
    .venv/bin/python bench/compression.py --variants [--reanalyze] [--skip-aside] [--rounding nearest]
        [--heldout-share 0.75 --max-heldout 750]

Prints one table per model and the target checks, writes bench/results/compression.json
(compression-quick.json with --quick).

--variants measures the project's goal "over 5 LeNet-5 variants (seeds, with and without BatchNorm) the
size plan at a 1% budget is >= 20x smaller with <= 1% disagreement on 1,000 unseen digits" instead:
it trains seeds 1-3 without BatchNorm and seeds 1-2 with BatchNorm after each conv
(toco_core.demo.train.lenet5_variant; the exporter folds BatchNorm into the convs), analyses each
with the demo LeNet-5's settings, recompresses the size row's plan ("TOCO size, budget 1%") and
measures it and onnxruntime's quantize_dynamic on the held-out digits, plus the demo LeNet-5 (seed 0) as a
reference row outside the goal; writes
bench/results/compression-variants.json. A sixth variant, BatchNorm seed 4, is kept aside: nobody
looked at it while developing (bench/plan_honesty.py included), it is measured the same way and printed
on its own line after the five, labelled "aside", and it is not one of the five the goal counts.
(BatchNorm seed 2 was the aside variant of an earlier run; it has been looked at since, so it is
one of the five.) No analysis or solver code changed after any result.
--heldout-share / --max-heldout analyse every variant (and the reference) with that calibration split
instead of the defaults (AnalysisSettings.heldout_share / max_heldout; the same split for every model,
never chosen per variant); their analyses are cached apart (analysis-<variant>-held<share>-<max>/) and
the results go to compression-variants-held<share>-<max>.json. Without --variants they set the same
split for the models' analyses (compression[-quick]-held<share>-<max>.json). --skip-aside leaves the
aside variant out of an experiment's run so it stays unlooked-at. --rounding compensated|nearest analyses
every model with that rounding (AnalysisSettings.compensated_rounding: compensated is the default), cached
and written apart (-<rounding>): `--rounding nearest` is the baseline of the compensated default.
Fidelity is measured on the 1000 held-out digits (never seen by the analysis); the analyses
are cached under bench/results/analysis-<model>/. --quick skips the 5M CNN and measures p50
with fewer runs. ``--models large`` (opt-in: its analysis takes minutes) adds the 224x224 grey conv
classifier of bench/analysis.py with its memory-tight row (bench/_compression_large.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._common and the checkout's packages

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._common import (
    PROFILES,
    RESULTS,
    Row,
    cached_analysis,
    codes_of_quantized,
    magnitude_uniform,
    measure,
    quantize_dynamic_model,
    within_budget,  # noqa: E402
)
from bench._compression_large import bench_large, memory_tight_checks  # noqa: E402
from toco_core.analysis.settings import AnalysisSettings  # noqa: E402
from toco_core.compression.qdq_int8 import quantize_qdq_int8  # noqa: E402
from toco_core.compression.storage import encode_model  # noqa: E402
from toco_core.demo.data import mnist_splits  # noqa: E402
from toco_core.demo.train import demo_model, lenet5_variant  # noqa: E402
from toco_core.device import load_profile, with_budgets  # noqa: E402
from toco_core.errors import TocoError  # noqa: E402
from toco_core.onnx_model import compressible_weights, load_model  # noqa: E402
from toco_core.plan import CompressionPlan, Policy  # noqa: E402
from toco_core.plan_build import build  # noqa: E402
from toco_core.probe import probe_device  # noqa: E402
from toco_core.recompress import recompress  # noqa: E402
from toco_core.runtime import run_model  # noqa: E402
from toco_core.solver import is_base_plan  # noqa: E402
from toco_core.units import format_size, parse_size  # noqa: E402

console = Console(width=200)
MODELS = {  # name: (trained, analysis settings)
    "lenet5": (True, None),
    "mlp": (True, None),
    "wide_cnn": (False, AnalysisSettings(max_rounds=2)),
}
OPT_IN = ("large",)  # bench/_compression_large.py: only with --models
BASELINES = ("ort quantize_dynamic", "ort quantize_static QDQ", "magnitude + uniform bits")
SIZE_ROW = "TOCO size, budget 1%"


def toco_setups(base_file: int, here) -> list[tuple[str, object, Policy]]:
    """(row name, device profile, policy) of the TOCO rows, budgets set as `toco recompress` does."""
    camera = with_budgets(load_profile(PROFILES / "camera-box.json"), memory=parse_size("256MB"),
                          storage=base_file // 10)
    hand = with_budgets(load_profile(PROFILES / "handheld.json"), storage=base_file // 20)

    def limits(p, **kw):
        return Policy(memory=p.memory_budget, storage=p.storage_budget, latency_s=p.latency_budget_s, **kw)

    return [("TOCO roomy", here, Policy()),
            ("TOCO camera box", camera, limits(camera)),
            ("TOCO handheld", hand, limits(hand, objective="size")),
            (SIZE_ROW, here, Policy(objective="size"))]


def toco_row(name, model, result, profile, policy, d, base_out, runs) -> tuple[Row, dict]:
    """Recompress for one profile and measure the runnable model like every other row."""
    try:
        built, report = recompress(model, result, profile, policy)
    except TocoError as exc:
        return Row(name, note=f"{type(exc).__name__}: {exc.args[0]}"), {}
    row = measure(Row(name, transfer_bytes=len(built.storage), seconds=report.seconds,
                      note=f"{report.plan.label}, {report.attempts} try"), built.runnable, d.x_heldout, d.y_heldout,
                  base_out, runs)
    t = time.perf_counter()
    build(model, result, report.plan)
    extra = {"report": report.model_dump(mode="json"), "build_s": time.perf_counter() - t}
    return row, extra


NOT_SERVED = " as int8 (not served)"


def int8_form_rows(model, result, extras: dict, d, base_out, runs) -> list[tuple[Row, dict]]:
    """Where no TOCO row runs int8 (the gate found int8 slower than fp32 on this CPU: LeNet-5 here), the
    points of the roomy and the size rows built in the int8 form anyway, so that TOCO's int8 runnable
    file still meets onnxruntime's int8 files in the int8-file checks (and nowhere else)."""
    if any(e.get("report", {}).get("plan", {}).get("runtime") == "int8" for e in extras.values()):
        return []
    out, seen = [], set()
    for name in ("TOCO roomy", SIZE_ROW):
        plan = extras.get(name, {}).get("report", {}).get("plan")
        int8 = None if plan is None else CompressionPlan(**{**plan, "runtime": "int8"})
        if int8 is None or is_base_plan(int8) or (int8.prune_scale, int8.quant_scale) in seen:
            continue  # no plan, the base itself, or a point already built
        seen.add((int8.prune_scale, int8.quant_scale))
        t = time.perf_counter()
        built = build(model, result, int8)
        row = measure(Row(name + NOT_SERVED, transfer_bytes=len(built.storage), seconds=time.perf_counter() - t,
                          note=f"{int8.label}: built for the int8-file checks; the gate serves fp32 here"),
                      built.runnable, d.x_heldout, d.y_heldout, base_out, runs)
        out.append((row, {"report": {"plan": int8.model_dump(mode="json")}, "build_s": row.seconds}))
    return out


def baseline_rows(model, path, d, base_out, runs) -> list[Row]:
    """fp32, onnxruntime quantize_dynamic and quantize_static (per-channel QDQ, 100 pool digits)."""
    base = measure(Row("base fp32", note="float32"), model, d.x_heldout, d.y_heldout, base_out, runs)
    base.transfer_bytes = base.file_bytes  # a float model travels as its plain ONNX file
    rows = [base]
    for name, make in ((BASELINES[0], lambda: quantize_dynamic_model(path)),
                       (BASELINES[1], lambda: quantize_qdq_int8(model, None, d.x_pool[:100], per_channel=True))):
        t = time.perf_counter()
        q = make()
        seconds = time.perf_counter() - t
        codes = codes_of_quantized(model, q)
        row = Row(name, transfer_bytes=len(encode_model(model, codes)), seconds=seconds,
                  note=f"int8, {len(codes)} weights coded")
        rows.append(measure(row, q, d.x_heldout, d.y_heldout, base_out, runs))
    return rows


def bench_model(name: str, d, here, runs: int, fresh: bool, split: AnalysisSettings | None = None,
                suffix: str = "") -> dict:
    """All rows of one model plus the TOCO reports; prints its table. ``split`` (calibration_split) replaces
    the model's held-out share, cap and rounding; its analysis is cached under the model's name + ``suffix``
    (``large`` takes only the rounding: its analysis keeps bench/analysis.py's settings otherwise)."""
    if name == "large":
        large = None if split is None else AnalysisSettings(compensated_rounding=split.compensated_rounding)
        res = bench_large(here, runs, fresh, baseline_rows, toco_row, large, suffix)
        print_table(name, [Row(**r) for r in res["rows"]], res["weights"], True, res["analysis_cached"],
                    res["analysis_s"])
        return res
    trained, settings = MODELS[name]
    if split is not None:
        settings = (settings or AnalysisSettings()).model_copy(
            update={"heldout_share": split.heldout_share, "max_heldout": split.max_heldout,
                    "compensated_rounding": split.compensated_rounding})
    path = demo_model(name, trained=trained)
    model = load_model(path)
    weights = sum(i.size for i in compressible_weights(model))
    t = time.perf_counter()
    result, hit = cached_analysis(name + suffix, model, d.x_pool, d.y_pool, settings, fresh)
    analysis_s = time.perf_counter() - t
    base_out = run_model(model, d.x_heldout)
    rows = baseline_rows(model, path, d, base_out, runs)
    base = rows[0].file_bytes
    assert base is not None  # the fp32 row has its file
    toco, extras = [], {}
    for label, profile, policy in toco_setups(base, here):
        row, extra = toco_row(label, model, result, profile, policy, d, base_out, runs)
        toco.append(row)
        extras[label] = extra
    for row, extra in int8_form_rows(model, result, extras, d, base_out, runs):
        toco.append(row)
        extras[row.name] = extra
    target = next((r.transfer_bytes for r in toco if r.name == SIZE_ROW and r.transfer_bytes), None)
    mag = Row(BASELINES[2], note="no fit" if target is None else "")
    if target is not None:
        t = time.perf_counter()
        found = magnitude_uniform(model, target, d.x_pool[:500], run_model(model, d.x_pool[:500]))
        if found is None:
            mag.note = f"nothing fits {format_size(target)}"
        else:
            q, codes, size, label = found
            mag = measure(Row(BASELINES[2], transfer_bytes=size, seconds=time.perf_counter() - t,
                              note=f"{label} (search on pool)"), q, d.x_heldout, d.y_heldout, base_out, runs)
    rows += [mag] + toco
    print_table(name, rows, weights, trained, hit, analysis_s)
    return {"weights": weights, "trained": trained, "analysis_cached": hit, "analysis_s": analysis_s,
            "rows": [r.as_dict() for r in rows], "toco": extras}


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    return {"size": format_size, "ms": lambda s: f"{s * 1e3:.3f}", "pct": lambda p: f"{p:.1%}",
            "s": lambda s: f"{s:.2f}"}[kind](v)


def print_table(name: str, rows: list[Row], weights: int, trained: bool, hit: bool, analysis_s: float) -> None:
    """One rich table: a row per method, sizes with their ratio to the fp32 file."""
    base = rows[0].file_bytes
    assert base is not None  # the fp32 row has its file
    note = "" if trained else " - random init: agreement/accuracy are not meaningful"
    t = Table(title=f"{name}: {weights:,} weights, analysis {'cached' if hit else f'{analysis_s:.0f} s'}{note}",
              caption="runnable file: the ONNX file onnxruntime runs; storage / transfer: the row's integer codes "
                      "through TOCO's coder (TOCO: its storage form; fp32: the plain file); session RSS: RSS growth "
                      "of a fresh process creating the session and running one batch-1 input; anon RSS: its "
                      "anonymous part (without onnxruntime's ~14 MB of file-backed code pages); p50: batch 1, best of "
                      "3 medians; agree: top-1 agreement with the fp32 model on held-out inputs")
    for col in ("method", "runnable file", "storage / transfer", "fp32 file / transfer", "session RSS",
                "anon RSS", "p50 ms", "agree", "accuracy", "time s", "plan / note"):
        t.add_column(col, justify="left" if col in ("method", "plan / note") else "right")
    for r in rows:
        ratio = f"{base / r.transfer_bytes:.1f}x" if r.transfer_bytes else "-"
        t.add_row(r.name, _fmt(r.file_bytes, "size"), _fmt(r.transfer_bytes, "size"), ratio, _fmt(r.rss, "size"),
                  _fmt(r.anon_rss, "size"), _fmt(r.p50_s, "ms"), _fmt(r.agreement, "pct"), _fmt(r.accuracy, "pct"),
                  _fmt(r.seconds, "s"), r.note)
    console.print(t)


def _rows(res: dict) -> dict[str, dict]:
    return {r["name"]: r for r in res["rows"]}


SIZE_TIE, AGREE_TIE = 0.03, 0.002  # "equal": sizes within 3%, agreement within 2 of 1000 digits


def served(r: dict) -> bool:
    """A TOCO row a box would run (every TOCO row but the int8 forms built only for the int8-file checks)."""
    return r["name"].startswith("TOCO") and not r["name"].endswith(NOT_SERVED)


def dominates(t: dict, b: dict) -> bool:
    """t is no worse than b in transfer size and agreement (up to the ties) and better in one."""
    as_small = t["transfer_bytes"] <= b["transfer_bytes"] * (1 + SIZE_TIE)
    as_good = t["agreement"] >= b["agreement"] - AGREE_TIE
    better = t["transfer_bytes"] < b["transfer_bytes"] * (1 - SIZE_TIE) or t["agreement"] > b["agreement"] + AGREE_TIE
    return as_small and as_good and better


def checks(results: dict) -> list[tuple[str, bool | None, str]]:
    """The project's compression goals: (what, met or None when not measured, the numbers)."""
    out = []
    if "lenet5" in results:
        rows = _rows(results["lenet5"])
        base = rows["base fp32"]["file_bytes"]
        ok = [r for r in rows.values() if served(r) and r["agreement"] is not None
              and within_budget(1 - r["agreement"], GOAL_DISAGREEMENT)]
        best = max(ok, key=lambda r: base / r["transfer_bytes"], default=None)
        text = "no TOCO row within 1% on held-out" if best is None else \
            f"{best['name']}: {base / best['transfer_bytes']:.1f}x at {1 - best['agreement']:.1%} disagreement"
        out.append(("LeNet-5 transfer >= 20x smaller at <= 1% disagreement",
                    best is not None and base / best["transfer_bytes"] >= 20, text))
    for name, res in results.items():
        if not res["trained"]:
            # random init is fine for size/latency/RSS rows, fidelity rows need training
            out.append((f"{name}: Pareto against the baselines", None, "random init: agreement is not meaningful"))
            continue
        rows = _rows(res)
        toco = [r for r in rows.values() if served(r) and r["transfer_bytes"]]
        for b in BASELINES if toco else ():
            br = rows.get(b)
            if not br or br["agreement"] is None:
                continue
            dom = [t for t in toco if dominates(t, br)]
            # when nothing dominates, show the most faithful TOCO row (the closest competitor)
            best = min(dom, key=lambda t: t["transfer_bytes"], default=None) or max(toco, key=lambda t: t["agreement"])
            text = (f"{best['name']} {format_size(best['transfer_bytes'])} / {best['agreement']:.1%} vs "
                    f"{format_size(br['transfer_bytes'])} / {br['agreement']:.1%} (transfer / agreement)")
            out.append((f"{name}: TOCO Pareto-dominates {b}", bool(dom), text))
    if "wide_cnn" in results:
        rows = _rows(results["wide_cnn"])
        base, hand = rows["base fp32"], rows["TOCO handheld"]
        rep = results["wide_cnn"]["toco"].get("TOCO handheld", {}).get("report")
        if hand["rss"] is None:
            out.append(("5M CNN handheld RSS and p50 below base", None, hand["note"]))
        else:
            ok = hand["rss"] < base["rss"] and hand["p50_s"] < base["p50_s"]
            one = (f"; 1 thread (recompress): {rep['p50_s'] * 1e3:.2f} vs {rep['base_p50_s'] * 1e3:.2f} ms"
                   if rep else "")
            out.append(("5M CNN handheld RSS and p50 below base", ok,
                        f"RSS {format_size(hand['rss'])} vs {format_size(base['rss'])}, "
                        f"p50 {hand['p50_s'] * 1e3:.2f} vs "
                        f"{base['p50_s'] * 1e3:.2f} ms{one}"))
    if "large" in results:
        out += memory_tight_checks(results["large"])
    for name, res in results.items():
        if res["trained"]:
            out += int8_file_checks(name, res)
    for name, res in results.items():
        # "1M parameters under 2 s": a model up to 1M weights gets 2 s, a larger one 2 s per 1M
        # (dividing a 61k-weight model's fixed session start-up by 0.06 would measure start-up, not size)
        millions = res["weights"] / 1e6
        allowed = 2.0 * max(1.0, millions)
        times = [(r["seconds"], res["toco"][r["name"]]["build_s"])
                 for r in _rows(res).values() if served(r) and r["seconds"]]
        if times:
            worst = max(times)
            out.append((f"{name}: recompression of {millions:.2f}M weights < {allowed:.1f} s", worst[0] < allowed,
                        f"worst {worst[0]:.2f} s = {worst[0] / millions:.2f} s/M (build alone {worst[1]:.2f} s)"))
    return out


INT8_BASELINES = BASELINES[:2]  # onnxruntime's int8 files


def int8_file_checks(name: str, res: dict) -> list[tuple[str, bool | None, str]]:
    """Per onnxruntime int8 baseline: is a TOCO row served in int8 no larger (runnable file) at equal or
    better held-out agreement (within AGREE_TIE)? None when no TOCO row ran int8."""
    rows = _rows(res)
    int8 = [r for r in rows.values() if r["name"].startswith("TOCO") and r["file_bytes"]
            and res["toco"].get(r["name"], {}).get("report", {}).get("plan", {}).get("runtime") == "int8"]
    out: list[tuple[str, bool | None, str]] = []
    for b in INT8_BASELINES:
        br = rows.get(b)
        if not br or br["file_bytes"] is None:
            continue
        what = f"{name}: TOCO int8 runnable file <= {b} file at equal or better agreement"
        if not int8:
            out.append((what, None, f"no TOCO row ran int8 ({b}: {format_size(br['file_bytes'])}, "
                                    f"{br['agreement']:.1%})"))
            continue
        ok = [t for t in int8 if t["file_bytes"] <= br["file_bytes"] and t["agreement"] >= br["agreement"] - AGREE_TIE]
        best = min(ok or int8, key=lambda t: t["file_bytes"])
        out.append((what, bool(ok), f"{best['name']} {format_size(best['file_bytes'])} / {best['agreement']:.1%} "
                                    f"vs {format_size(br['file_bytes'])} / {br['agreement']:.1%} "
                                    "(runnable file / agreement)"))
    return out


VARIANTS = ((1, False), (2, False), (3, False), (1, True), (2, True))  # (seed, BatchNorm after each conv)
# kept aside: never looked at while developing (module docstring); measured, printed apart, not in the goal
ASIDE = (4, True)
# the demo LeNet-5 (seed 0), the model the project was developed on: a reference row, not one of the 5
REFERENCE = (0, False)
GOAL_RATIO, GOAL_DISAGREEMENT = 20.0, 0.01


def variant_name(seed: int, batchnorm: bool) -> str:
    """``lenet5-s1`` / ``lenet5-bn-s1``: the row label and the analysis cache's name (the demo model
    is ``lenet5``, sharing the models run's cached analysis)."""
    return "lenet5" if (seed, batchnorm) == (0, False) else f"lenet5{'-bn' if batchnorm else ''}-s{seed}"


def calibration_split(heldout_share: float | None, max_heldout: int | None,
                      rounding: str | None = None) -> tuple[AnalysisSettings | None, str]:
    """The analysis settings of an experiment (a calibration split, a rounding) and the suffix of its
    cache and result names.

    (None, "") for the defaults (both None, rounding None); otherwise AnalysisSettings with the given
    held-out share and cap (the defaults for the one not given) and "-held<share>-<max>", and with a
    rounding ("compensated" or "nearest") "-<rounding>". Raises pydantic's ValidationError for a share
    outside (0, 1) or a cap below 10.
    """
    if heldout_share is None and max_heldout is None and rounding is None:
        return None, ""
    default = AnalysisSettings()
    s = AnalysisSettings(heldout_share=default.heldout_share if heldout_share is None else heldout_share,
                         max_heldout=default.max_heldout if max_heldout is None else max_heldout,
                         compensated_rounding=default.compensated_rounding if rounding is None
                         else rounding == "compensated")
    split = "" if heldout_share is None and max_heldout is None else f"-held{s.heldout_share:g}-{s.max_heldout}"
    return s, split + ("" if rounding is None else f"-{rounding}")


def bench_variant(seed: int, batchnorm: bool, d, here, runs: int, fresh: bool,
                  settings: AnalysisSettings | None = None, suffix: str = "") -> dict:
    """One LeNet-5 variant: base, onnxruntime's quantize_dynamic and TOCO's size plan at a 1% budget,
    analysed with ``settings`` (None: the defaults) and cached under the variant's name + ``suffix``."""
    name = variant_name(seed, batchnorm)
    path = lenet5_variant(seed, batchnorm)
    model = load_model(path)
    t = time.perf_counter()
    result, hit = cached_analysis(name + suffix, model, d.x_pool, d.y_pool, settings, fresh)
    analysis_s = time.perf_counter() - t
    base_out = run_model(model, d.x_heldout)
    # p50 and RSS are not what this mode measures: few runs, no session RSS on the baselines
    base = measure(Row("base fp32", note="float32"), model, d.x_heldout, d.y_heldout, base_out, runs, rss=False)
    t = time.perf_counter()
    q = quantize_dynamic_model(path)
    seconds = time.perf_counter() - t
    # its transfer through TOCO's coder too, for comparison with the TOCO storage form (same coder)
    dyn = measure(Row(BASELINES[0], transfer_bytes=len(encode_model(model, codes_of_quantized(model, q))),
                      seconds=seconds, note="int8"), q, d.x_heldout, d.y_heldout, base_out, runs, rss=False)
    size, extra = toco_row(SIZE_ROW, model, result, here, Policy(objective="size"), d, base_out, runs)
    return {"name": name, "seed": seed, "batchnorm": batchnorm, "aside": (seed, batchnorm) == ASIDE,
            "reference": (seed, batchnorm) == REFERENCE,
            "onnx_file": str(path), "onnx_file_bytes": path.stat().st_size, "analysis_cached": hit,
            "analysis_s": analysis_s, "calibration_samples": len(result.heldout_x),
            "analysis_samples": len(result.analysis_x), "rows": [r.as_dict() for r in (base, dyn, size)],
            "toco": extra}


def variant_summary(res: dict) -> dict:
    """The goal's numbers of one variant; every ratio is against the fp32 ONNX file (the base row's bytes)."""
    base, dyn, size = (res["rows"][i] for i in range(3))
    fp32 = base["file_bytes"]
    out = {"fp32_file_bytes": fp32, "base_accuracy": base["accuracy"],
           "dyn_file_bytes": dyn["file_bytes"], "dyn_file_ratio": fp32 / dyn["file_bytes"],
           "dyn_transfer_bytes": dyn["transfer_bytes"], "dyn_disagreement": 1 - dyn["agreement"],
           "toco_storage_bytes": size["transfer_bytes"], "toco_plan": size["note"]}
    if size["transfer_bytes"] and size["agreement"] is not None:
        out |= {"toco_storage_ratio": fp32 / size["transfer_bytes"], "toco_disagreement": 1 - size["agreement"],
                "toco_file_bytes": size["file_bytes"]}
        out["goal_met"] = (out["toco_storage_ratio"] >= GOAL_RATIO
                           and within_budget(out["toco_disagreement"], GOAL_DISAGREEMENT))
    else:  # no plan: the row's note holds the error
        out |= {"toco_storage_ratio": None, "toco_disagreement": None, "toco_file_bytes": None, "goal_met": False}
    return out


def print_variants(results: list[dict], aside: dict | None, reference: dict) -> dict:
    """The per-variant table (the five, then the aside variant, None when skipped, and the reference row on
    their own lines, both outside the goal) and the spread over the five; returns the spread."""
    t = Table(title="LeNet-5 variants: size plan at a 1% budget vs onnxruntime quantize_dynamic, 1,000 unseen digits")
    for col in ("variant", "base acc", "fp32 file", "TOCO storage form", "fp32 file / storage", "TOCO disagree",
                "ORT dyn file", "fp32 file / ORT file", "ORT disagree", ">=20x, <=1%", "TOCO plan"):
        t.add_column(col, justify="left" if col in ("variant", "TOCO plan") else "right")
    for res in [*results, *([] if aside is None else [aside]), reference]:
        if res is aside or (aside is None and res is reference):
            t.add_section()  # the aside variant below a rule: not one of the five
        s = res["summary"]
        ratio = s["toco_storage_ratio"]
        tag = " (aside, not in the goal)" if res["aside"] else " (demo, not in the goal)" if res["reference"] else ""
        t.add_row(res["name"] + tag, _fmt(s["base_accuracy"], "pct"),
                  _fmt(s["fp32_file_bytes"], "size"), _fmt(s["toco_storage_bytes"], "size"),
                  "-" if ratio is None else f"{ratio:.1f}x", _fmt(s["toco_disagreement"], "pct"),
                  _fmt(s["dyn_file_bytes"], "size"), f"{s['dyn_file_ratio']:.1f}x", _fmt(s["dyn_disagreement"], "pct"),
                  "yes" if s["goal_met"] else "NO", s["toco_plan"])
    Console(width=200).print(t)  # wide enough for the plan column on one line
    ratios = [r["summary"]["toco_storage_ratio"] or 0.0 for r in results]  # no plan counts as 0x
    worst = max((r["summary"]["toco_disagreement"] for r in results if r["summary"]["toco_disagreement"] is not None),
                default=None)
    missed = [r["name"] for r in results if not r["summary"]["goal_met"]]
    lo, med, hi = min(ratios), float(np.median(ratios)), max(ratios)
    console.print(f"TOCO storage form vs fp32 ONNX file over the {len(results)} variants: min {lo:.1f}x, median "
                  f"{med:.1f}x, max {hi:.1f}x; max disagreement {_fmt(worst, 'pct')}; goal (>= {GOAL_RATIO:.0f}x and "
                  f"<= {GOAL_DISAGREEMENT:.0%} for every variant): "
                  f"{'NOT met, missed: ' + ', '.join(missed) if missed else 'met'}")
    if aside is None:
        console.print("aside variant skipped (--skip-aside): still unlooked-at")
        return spread_of(results, lo, med, hi, worst, missed)
    a = aside["summary"]
    console.print(f"aside variant {aside['name']} (never looked at while developing): storage form "
                  f"{'no plan' if a['toco_storage_ratio'] is None else format(a['toco_storage_ratio'], '.1f') + 'x'}"
                  f" of the fp32 file at {_fmt(a['toco_disagreement'], 'pct')} disagreement; "
                  f"{'meets' if a['goal_met'] else 'misses'} >= {GOAL_RATIO:.0f}x and <= {GOAL_DISAGREEMENT:.0%}")
    return spread_of(results, lo, med, hi, worst, missed)


def spread_of(results: list[dict], lo: float, med: float, hi: float, worst: float | None, missed: list[str]) -> dict:
    """The spread's JSON record."""
    return {"toco_storage_ratio_min": lo, "toco_storage_ratio_median": med, "toco_storage_ratio_max": hi,
            "toco_disagreement_max": worst,
            "dyn_file_ratio_median": float(np.median([r["summary"]["dyn_file_ratio"] for r in results])),
            "goal_met_all": not missed, "missed": missed}


def run_variants(args, d, here) -> None:
    """--variants: every LeNet-5 variant, the table, the spread and bench/results/compression-variants.json."""
    t0 = time.perf_counter()
    settings, suffix = calibration_split(args.heldout_share, args.max_heldout, args.rounding)
    results = []
    for seed, bn in (REFERENCE, *VARIANTS, *(() if args.skip_aside else (ASIDE,))):
        res = bench_variant(seed, bn, d, here, 20, args.reanalyze, settings, suffix)
        res["summary"] = variant_summary(res)
        results.append(res)
        s = res["summary"]
        # one line per variant as it lands: the run is long and the box is shared
        console.print(f"{res['name']}: analysis {res['analysis_s']:.0f} s ({res['calibration_samples']} calibration, "
                      f"{res['analysis_samples']} analysis samples), storage ratio "
                      f"{s['toco_storage_ratio'] or 0:.1f}x, disagreement {_fmt(s['toco_disagreement'], 'pct')}")
    if args.skip_aside:
        reference, results, aside = results[0], results[1:], None
    else:
        reference, results, aside = results[0], results[1:-1], results[-1]
    spread = print_variants(results, aside, reference)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"compression-variants{suffix}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
                               "settings": None if settings is None else settings.model_dump(),
                               "ratios": "fp32 ONNX file bytes / the row's bytes: TOCO's storage form (what a box "
                                         "stores and receives), onnxruntime's quantized ONNX file",
                               "held_out_digits": len(d.x_heldout), "aside": variant_name(*ASIDE),
                               "variants": results, "aside_result": aside, "spread": spread,
                               "reference": reference}, indent=1))
    console.print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


def main() -> None:
    """Parse the options, run every model, print the checks, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 5M CNN, fewer latency runs")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join((*MODELS, *OPT_IN)))
    ap.add_argument("--reanalyze", action="store_true", help="ignore the cached analyses")
    ap.add_argument("--variants", action="store_true",
                    help="the 5 LeNet-5 variants' size plans instead of the models (see the module doc)")
    ap.add_argument("--heldout-share", type=float, default=None,
                    help="share of the pool held out for calibration (default: the settings' default)")
    ap.add_argument("--max-heldout", type=int, default=None,
                    help="at most this many calibration samples (default: the settings' default)")
    ap.add_argument("--rounding", choices=("compensated", "nearest"), default=None,
                    help="analyse with this rounding (AnalysisSettings.compensated_rounding; default: the settings' "
                         "default); cached and written apart (-<rounding>)")
    ap.add_argument("--skip-aside", action="store_true",
                    help="--variants: leave the aside variant out (experiments; it stays unlooked-at)")
    args = ap.parse_args()
    if args.variants:
        run_variants(args, mnist_splits(), probe_device(benchmark=False))
        return
    names = args.models.split(",") if args.models else [m for m in MODELS if not (args.quick and m == "wide_cnn")]
    runs = 50 if args.quick else 200
    d, here = mnist_splits(), probe_device(benchmark=False)
    split, suffix = calibration_split(args.heldout_share, args.max_heldout, args.rounding)
    t0 = time.perf_counter()
    results = {n: bench_model(n, d, here, runs, args.reanalyze, split, suffix) for n in names}
    found = checks(results)
    t = Table(title="targets")
    for col in ("target", "met", "numbers"):
        t.add_column(col)
    for what, ok, text in found:
        t.add_row(what, {True: "yes", False: "NO", None: "n/a"}[ok], text)
    console.print(t)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a quick run never clobbers a full one
    out = RESULTS / (f"compression-quick{suffix}.json" if args.quick else f"compression{suffix}.json")
    out.write_text(json.dumps({"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0, "models": results,
                               "checks": [{"target": w, "met": ok, "numbers": x} for w, ok, x in found]}, indent=1))
    console.print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
