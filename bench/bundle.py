"""Bundle benchmark: bytes on the wire of the parts bundle against the fp32 model and today's bundle.

    .venv/bin/python bench/bundle.py [--models lenet5,mlp,large-s0,large-s1,...] [--reanalyze] [--rounding nearest]

Per model, measured in one run: the fp32 model file, the format-1 bundle (fp32 model + analysis
directory, what the fleet shipped so far) and the parts bundle (weights part = the signed manifest
+ head + code and prune planes + bias deltas, of which the bias deltas are also shown apart;
calibration part = self-test samples and base outputs, int8 range samples). Per demo box
(handheld: smallest plan within 1%, 64 MB; camera box: storage a tenth of the fp32 file; line PC:
no limits), the plan its recompression from parts picks, the bytes it downloads (weights and
calibration apart), whether its build from parts is bit-identical to the server's build, and its
disagreement with the base on held-out inputs (never in the analysis pool) against the prediction.
Last, the bytes a handheld that later recompresses to the line PC's plan fetches on top.
The bundle is laid out for its fleet, the three boxes (band bounds at their planned prune levels,
toco_core.band_layout), as the fleet server packs it; "no fleet" is the weights download of each
box from the layout the server uses when it knows no box (every level a bound).
The per-point rounding parts of compensated rounding (the analysis default) are shown apart like the
biases; --rounding nearest|compensated analyses with that rounding instead (cached and written apart:
analysis-<model>-<rounding>/, model "<model>-<rounding>").
Writes bench/results/bundle.json (a row per model, replacing that model's row of an earlier run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._common and the checkout's packages

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench._common import PROFILES, RESULTS, cached_analysis  # noqa: E402
from toco_core.analysis_result import save_result  # noqa: E402
from toco_core.band_layout import planned_levels  # noqa: E402
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle  # noqa: E402
from toco_core.device import load_profile, with_budgets  # noqa: E402
from toco_core.fidelity import compare_outputs  # noqa: E402
from toco_core.messages import encode  # noqa: E402
from toco_core.model_bundle import BundleInfo, bundle_files  # noqa: E402
from toco_core.onnx_model import compressible_weights, load_model, model_hash, output_kind  # noqa: E402
from toco_core.parts_bundle import BundleHead, decode_calibration, pack_parts, source_from_parts  # noqa: E402
from toco_core.plan import Policy  # noqa: E402
from toco_core.plan_build import build  # noqa: E402
from toco_core.recompress import recompress  # noqa: E402
from toco_core.runtime import run_model  # noqa: E402
from toco_core.units import format_size, parse_size  # noqa: E402

console = Console(width=200)


def load_case(name: str):
    """(model path, pool x, pool y, held-out x, analysis settings) of a benchmark model."""
    from toco_core.analysis.settings import AnalysisSettings

    if name.startswith("large"):  # large-s0, large-s1, large_wide-s0: toco_core.demo.large
        from toco_core.demo.large import large_model, large_splits

        arch, _, seed = name.partition("-s")
        s = large_splits()
        return large_model(seed=int(seed or 0), arch=arch), s.x_pool, s.y_pool, s.x_heldout, \
            AnalysisSettings(max_rounds=2, max_heldout=400)
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    d = mnist_splits()
    return demo_model(name), d.x_pool, d.y_pool, d.x_heldout, None


def devices(base_file: int):
    """(name, profile, policy) of the three demo boxes."""
    hand = load_profile(PROFILES / "handheld.json")
    camera = with_budgets(load_profile(PROFILES / "camera-box.json"), memory=parse_size("256MB"),
                          storage=base_file // 10)
    line = load_profile(PROFILES / "line-pc.json")
    return [("handheld", hand, Policy(objective="size", memory=hand.memory_budget)),
            ("camera-box", camera, Policy(storage=camera.storage_budget, memory=camera.memory_budget)),
            ("line-pc", line, Policy())]


def _split(parts: dict[str, bytes], names) -> tuple[int, int]:
    """(weights bytes, calibration bytes) of the named parts."""
    w = sum(len(parts[n]) for n in names if not n.startswith("calib/") and n != "base")
    c = sum(len(parts[n]) for n in names if n.startswith("calib/"))
    return w, c


def _same(a, b) -> bool:
    ia = {t.name: t.SerializeToString() for t in a.graph.initializer}
    return ia == {t.name: t.SerializeToString() for t in b.graph.initializer}


def bench_model(name: str, reanalyze: bool, rounding: str | None = None) -> dict:
    """Every number of one model's table (see module doc)."""
    from toco_core.analysis.settings import AnalysisSettings

    path, px, py, hx, settings = load_case(name)
    if rounding is not None:
        compensated = rounding == "compensated"
        settings = (settings or AnalysisSettings()).model_copy(update={"compensated_rounding": compensated})
        name += f"-{rounding}"
    model = load_model(path)
    result, _ = cached_analysis(name, model, px, py, settings, fresh=reanalyze)
    fp32 = len(Path(path).read_bytes())
    info = BundleInfo(model_name=name, model_sha256=model_hash(model))
    adir = save_result(result, RESULTS / f"analysis-{name}")
    today = len(pack_bundle(bundle_files(Path(path), adir, info)))
    boxes = devices(fp32)
    # as the fleet server lays it out: the boxes' profiles (their configured budgets in them), both objectives
    bounds = planned_levels(result, compressible_weights(model), fp32, [p for _, p, _ in boxes], 0.01)
    parts = pack_parts(model, result, info, band_bounds=bounds)
    generic = pack_parts(model, result, info)
    head = BundleHead(parts["head"])
    # every box receives the signed manifest (a line per part, deflated on the wire) before any part:
    # counted as weights
    key = generate_private_key()
    manifest = len(encode(make_manifest(pack_bundle(parts), private_key=key)))
    generic_manifest = len(encode(make_manifest(pack_bundle(generic), private_key=key)))
    full_w, full_c = _split(parts, parts)
    full_w += manifest
    base_held = run_model(model, hx)
    row: dict = {"model": name, "weights": result.manifest.weights, "fp32_file": fp32, "today_bundle": today,
           "parts_weights": full_w, "parts_calibration": full_c, "manifest": manifest,
           "parts_biases": sum(len(v) for k, v in parts.items() if k.startswith("bias/")),
           "parts_rounding": sum(len(v) for k, v in parts.items() if k.startswith("round/")),
           "heldout_samples": len(decode_calibration(parts["calib/heldout"], "calib/heldout")["x"]), "devices": [],
           "band_bounds": bounds}
    held_by = {}
    for dev, profile, policy in boxes:
        # the box plans from the head, fetches what its best plan lists, and builds from those parts
        source, res, _ = source_from_parts(parts)
        built, report = recompress(source, res, profile, policy, measure_memory=False)
        plans_parts = head.parts_for_plan(report.plan)
        mine = source_from_parts({n: parts[n] for n in plans_parts})
        from_parts = build(mine[0], mine[1], report.plan)
        exact = _same(from_parts.runnable, build(model, result, report.plan).runnable)
        fid = compare_outputs(base_held, run_model(from_parts.runnable, hx), None, output_kind(model))
        w, c = _split(parts, plans_parts)
        w += manifest
        held_by[dev] = set(plans_parts)
        generic_w = _split(generic, BundleHead(generic["head"]).parts_for_plan(report.plan))[0] + generic_manifest
        row["devices"].append({"device": dev, "plan": report.plan.label, "storage_form": report.storage_bytes,
                               "download_rounding": sum(len(parts[n]) for n in plans_parts if n.startswith("round/")),
                               "download_weights": w, "download_calibration": c, "exact": exact,
                               "download_weights_no_fleet": generic_w,
                               "predicted": report.plan.predicted_disagreement, "heldout": fid.disagreement,
                               "heldout_n": fid.n})
    extra = held_by["line-pc"] - held_by["handheld"]
    row["roomier_extra"] = sum(len(parts[n]) for n in extra)
    row["roomier_parts"] = sorted(extra)
    return row


def print_table(rows: list[dict]) -> None:
    """One table for the bundles, one for the boxes."""
    t = Table(title="bundle bytes on the wire (ratios against the fp32 model file, same run)")
    for col in ("model", "weights", "fp32 file", "today's bundle", "parts: weights", "of which biases",
                "of which rounding", "parts: calibration", "parts: total", "self-test samples"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        f = r["fp32_file"]
        ratio = lambda v: f"{format_size(v)} ({v / f:.2f}x)"  # noqa: E731
        t.add_row(r["model"], f"{r['weights']:,}", format_size(f), ratio(r["today_bundle"]), ratio(r["parts_weights"]),
                  ratio(r["parts_biases"]), ratio(r.get("parts_rounding", 0)), ratio(r["parts_calibration"]),
                  ratio(r["parts_weights"] + r["parts_calibration"]),
                  str(r["heldout_samples"]))
    console.print(t)
    t = Table(title="per box: the plan built from parts, what it downloads, held-out fidelity")
    for col in ("model", "box", "plan", "storage form", "download: weights", "of which rounding", "no fleet: weights",
                "download: calib",
                "download: total", "exact", "predicted", "held-out"):
        t.add_column(col, justify="left" if col in ("model", "box", "plan") else "right")
    for r in rows:
        f = r["fp32_file"]
        for d in r["devices"]:
            total = d["download_weights"] + d["download_calibration"]
            t.add_row(r["model"], d["device"], d["plan"], format_size(d["storage_form"]),
                      f"{format_size(d['download_weights'])} ({d['download_weights'] / f:.3f}x)",
                      format_size(d.get("download_rounding", 0)),
                      f"{format_size(d['download_weights_no_fleet'])} ({d['download_weights_no_fleet'] / f:.3f}x)",
                      format_size(d["download_calibration"]), f"{format_size(total)} ({total / f:.2f}x)",
                      "yes" if d["exact"] else "NO", f"{d['predicted']:.2%}",
                      f"{d['heldout']:.2%} of {d['heldout_n']}")
        t.add_row(r["model"], "handheld -> line-pc", "recompress to a roomier plan", "",
                  f"+{format_size(r['roomier_extra'])}", "", "", "", "", "", "", "")
    console.print(t)


def main() -> None:
    """Run the benchmark for the chosen models and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lenet5,mlp")
    ap.add_argument("--reanalyze", action="store_true")
    ap.add_argument("--rounding", choices=("compensated", "nearest"), default=None,
                    help="analyse with this rounding (see the module doc)")
    args = ap.parse_args()
    rows = [bench_model(m, args.reanalyze, args.rounding) for m in args.models.split(",")]
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bundle.json"  # rows by model, so runs over different models add up
    kept = {r["model"]: r for r in (json.loads(out.read_text()) if out.is_file() else [])}
    kept.update({r["model"]: r for r in rows})
    out.write_text(json.dumps(list(kept.values()), indent=1))


if __name__ == "__main__":
    main()
