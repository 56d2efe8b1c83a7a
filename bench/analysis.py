"""Benchmark of the tolerance analysis: its cost, and pruning quality against baselines.

    .venv/bin/python bench/analysis.py [--quick] [--models lenet5,...] [--rounding compensated|nearest]

1. Wall time and peak memory of the whole ``toco analyze`` command (QBC, pruning rounds,
   calibration, process start-up) run as a subprocess on the MNIST pool, for LeNet-5,
   LeNet-300-100 and the ~5M-parameter CNN (``--quick`` skips the latter); with ``--large``
   also on two 224x224 models with a 400-image pool of their own digits (toco_core.demo.large:
   grey, 1.57M weights; toco_core.demo.mobile: RGB MobileNet-style, 1.81M), whose peak memory
   has a goal: below 1.6 GB (1,526 MiB). ``--models mobile,lenet5`` runs only those rows.
   One row per task kind (toco_core.task_kind) on the small test models of
   tests/analysis_eval (trained here in seconds): a regression MLP, an autoencoder's anomaly
   score with a decision threshold, an embedding and a digits classifier whose graph ends in
   ArgMax + a label lookup (``--models regression,score,embedding,labelled``). Each is analysed at
   a 2% budget and then recompressed for the handheld profile (smallest size within the budget):
   the table gives its compression ratio (base file / storage form) and its fidelity on held-out
   samples the analysis never saw, in the kind's own metric.
   Peak memory is the larger of the command's peak RSS (the kernel's high-water mark, VmHWM)
   and the peak PSS summed over its process tree (polled every 0.5 s: each read walks the page
   tables and slowed the command when taken every 50 ms; a summed RSS would count the pages a
   forked child shares with its parent twice).
2. Pruning at equal sparsity, no retraining, agreement with the base model on the 1000
   held-out digits the analysis never sees: tolerance pruning (the analysis' prune ranks,
   zero w_i where r_i <= s) vs global and layer-wise magnitude pruning, measured in the same
   run. From a 2%-step grid we derive the highest sparsity each method keeps at >= 99% and
   >= 98% agreement and the ratio best-baseline-kept / tolerance-kept.

Prints rich tables and writes the same data to bench/results/analysis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the checkout's packages (and its tests' models) when run as a script

from toco_core.analysis_result import load_result  # noqa: E402
from toco_core.compression.pruning import magnitude_thresholds, prune  # noqa: E402
from toco_core.demo.data import mnist_splits  # noqa: E402
from toco_core.demo.train import demo_model  # noqa: E402
from toco_core.fidelity import compare_outputs  # noqa: E402
from toco_core.onnx_model import load_model, output_kind, read_weights, with_weights  # noqa: E402
from toco_core.runtime import run_model  # noqa: E402

MODELS = {"lenet5": "LeNet-5", "mlp": "LeNet-300-100", "wide_cnn": "CNN ~5M",
          "large": "224x224 grey CNN", "mobile": "224x224 RGB MobileNet-style",
          "regression": "regression MLP", "score": "autoencoder score", "embedding": "embedding MLP",
          "labelled": "classifier + label tail"}
TASK_MODELS = ("regression", "score", "embedding", "labelled")
TASK_BUDGET = 0.02  # the task-kind tests' budget (tests/analysis/test_task_kinds.py)
TASK_PROFILE = "handheld"  # its size objective takes the most compressed plan within the budget
LARGE = ("large", "mobile")
LARGE_POOL = 400
# issue 17: LeNet-5 under 15 s, the >= 1.5M-weight 224x224 model under 4 minutes, on 2 cores
TIME_TARGET_S = {"lenet5": 15.0, "large": 240.0, "wide_cnn": 600.0}
RSS_TARGET_MIB = {"large": 1.6e9 / 2**20, "mobile": 1.6e9 / 2**20}
PRUNED_MODELS = ("lenet5", "mlp")
TABLE_SPARSITY = (0.50, 0.60, 0.70, 0.80, 0.90, 0.95)
FINE_SPARSITY = tuple(round(0.10 + 0.02 * i, 2) for i in range(44))  # 10 .. 96 %
KEPT_RATIO_TARGET = {0.99: 1.0, 0.98: 1.3}  # agreement threshold -> min best-baseline / tolerance kept
METHODS = ("tolerance", "global magnitude", "layer-wise magnitude")
console = Console(width=150)


def _high_water_mark(pid: int) -> int:
    """The kernel's peak RSS of a running process (VmHWM), bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _tree_pss(root: psutil.Process) -> tuple[int, int] | None:
    """(PSS summed over ``root`` and its descendants, processes) in bytes, or None when the tree
    changed under the read.

    PSS (proportional set size) counts a page shared by k processes as 1/k in each: summing RSS
    over a forked tree counts every copy-on-write page once per process instead.
    """
    try:
        tree = [root, *root.children(recursive=True)]
        return sum(p.memory_full_info().pss for p in tree), len(tree)
    except psutil.Error:  # a process exited between the listing and the read
        return None


def analyze_subprocess(model: Path, pool: Path, out: Path, log: Path, interval: float = 0.05,
                       extra: tuple[str, ...] = (), pss_interval: float = 0.5) -> dict:
    """Run ``toco analyze MODEL --pool POOL -o OUT [EXTRA...]`` as a child process.

    Returns wall seconds, CPU seconds (user + sys of the waited child: unlike wall time, not
    inflated by other load on the machine), the 1-minute load average at the start and memory
    in MiB: ``peak_rss_mb``, the kernel's high-water mark of the command's resident set (VmHWM,
    read every ``interval`` s: exact however short the peak, bar the last interval before exit;
    the waited child's ru_maxrss is no use, it keeps this process' own peak from before the
    exec: 9,901 MiB for a command whose RSS, polled, peaked at 1,598); ``peak_pss_mb``, the PSS summed over
    its process tree, polled every ``pss_interval`` s (PSS does not count pages a child shares with
    its parent twice; reading it walks every page table of the tree, which at every 0.05 s slowed
    LeNet-5's analysis by 0.6-1.7 s of its 15); ``max_processes`` the largest tree seen. Raises
    RuntimeError with the log's tail when the command fails.
    """
    cmd = [sys.executable, "-m", "toco_cli", "analyze", str(model), "--pool", str(pool), "-o", str(out), *extra]
    peak_rss = peak_pss = procs = 0
    load = os.getloadavg()[0]
    t0 = next_pss = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT.parent)
        root = psutil.Process(proc.pid)
        while True:
            # wait4 rather than poll(): it hands back this child's own CPU times
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_rss = max(peak_rss, _high_water_mark(proc.pid))
            if time.perf_counter() >= next_pss and (pss := _tree_pss(root)) is not None:
                peak_pss, procs = max(peak_pss, pss[0]), max(procs, pss[1])
                next_pss = time.perf_counter() + pss_interval
            time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": peak_rss / 2**20,
            "peak_pss_mb": peak_pss / 2**20, "max_processes": procs,
            "sample_interval_s": interval, "load_avg_1min": load, "command": " ".join(cmd)}


def pruned_weights(weights: dict, method: str, sparsity: float, ranks: dict) -> dict:
    """The weights pruned to ``sparsity`` by ``method`` (one of METHODS); inputs untouched.

    tolerance: zero w_i where prune rank r_i <= s; magnitude: |w| <= the s-quantile of |w|
    over all tensors (global) or per tensor (layer-wise).
    """
    if method == "tolerance":
        return {k: np.where(ranks[k] <= sparsity, np.float32(0), w).astype(np.float32) for k, w in weights.items()}
    thresholds = magnitude_thresholds(weights, sparsity, layerwise=method == "layer-wise magnitude")
    return prune(weights, {k: np.array(t, dtype=np.float32) for k, t in thresholds.items()})


def agreement_curves(model_path: Path, result_dir: Path, x: np.ndarray) -> dict:
    """Agreement with the base model on ``x`` for every method at every grid sparsity.

    Returns {"sparsity": [...], "agreement": {method: [...]}, "measured_sparsity": {method: [...]}}.
    """
    model = load_model(model_path)
    kind = output_kind(model)
    weights = read_weights(model)
    tmap = load_result(result_dir).tolerances
    assert tmap is not None, "an analysis on disk has its tolerance map"
    ranks = tmap.prune_rank
    base = run_model(model, x)
    grid = sorted(set(FINE_SPARSITY) | set(TABLE_SPARSITY))
    total = sum(w.size for w in weights.values())
    agree: dict[str, list[float]] = {m: [] for m in METHODS}
    measured: dict[str, list[float]] = {m: [] for m in METHODS}
    for s in grid:
        for m in METHODS:
            w = pruned_weights(weights, m, s, ranks)
            measured[m].append(sum(int((v == 0).sum()) for v in w.values()) / total)
            agree[m].append(compare_outputs(base, run_model(with_weights(model, w), x), kind=kind).agreement)
    return {"sparsity": grid, "agreement": agree, "measured_sparsity": measured}


def max_sparsity_at(sparsity: list[float], agreement: list[float], threshold: float) -> float:
    """Highest sparsity reached before agreement first drops below ``threshold``.

    The unpruned model (s = 0, agreement 1) anchors the curve; between the last grid point
    that meets the threshold and the first that misses it, s is interpolated linearly:
    s* = s_a + (a_a - thr) / (a_a - a_b) * (s_b - s_a).
    """
    s_pts, a_pts = [0.0, *sparsity], [1.0, *agreement]
    for i in range(1, len(s_pts)):
        if a_pts[i] < threshold:
            s_a, s_b, a_a, a_b = s_pts[i - 1], s_pts[i], a_pts[i - 1], a_pts[i]
            return s_a + (a_a - threshold) / (a_a - a_b) * (s_b - s_a)
    return s_pts[-1]  # never dropped: a lower bound


def kept_verdicts(curves: dict) -> dict:
    """Per agreement threshold: max sparsity and kept share per method, kept ratio, pass/fail."""
    out = {}
    for thr, target in KEPT_RATIO_TARGET.items():
        best = {m: max_sparsity_at(curves["sparsity"], curves["agreement"][m], thr) for m in METHODS}
        kept = {m: 1.0 - s for m, s in best.items()}
        ratio = min(kept["global magnitude"], kept["layer-wise magnitude"]) / kept["tolerance"]
        out[f"{thr:.2f}"] = {"max_sparsity": best, "kept": kept, "ratio": ratio,
                             "target_ratio": target, "passed": ratio >= target}
    return out


def write_pool(folder: Path) -> Path:
    """Save the MNIST analysis pool (x, y) as .npz for ``toco analyze``; returns its path."""
    s = mnist_splits()
    path = folder / "mnist_pool.npz"
    np.savez(path, x=s.x_pool, y=s.y_pool)
    return path


def write_large_pool(arch: str, folder: Path) -> Path:
    """Save the first LARGE_POOL pool digits of a 224x224 model's own data as .npz; returns its path."""
    from toco_core.demo.large import large_splits
    from toco_core.demo.mobile import mobile_splits

    s = mobile_splits() if arch == "mobile" else large_splits()
    path = folder / f"{arch}_pool.npz"
    np.savez(path, x=s.x_pool[:LARGE_POOL], y=s.y_pool[:LARGE_POOL])
    return path


def model_path(arch: str) -> Path:
    """The cached trained ONNX file of a benchmark model."""
    if arch == "mobile":
        from toco_core.demo.mobile import mobile_model

        return mobile_model()
    if arch == "large":
        from toco_core.demo.large import large_model

        return large_model()
    return demo_model(arch, trained=True)


def task_case(arch: str, folder: Path) -> tuple[Path, Path, np.ndarray, tuple[str, ...]]:
    """A task-kind row's model, pool, held-out inputs and ``toco analyze`` arguments.

    Takes the row (one of TASK_MODELS) and a folder for the files. The models are trained here
    with torch (tests/analysis_eval: seconds each); the pool is the first 800 pool samples.
    Returns (ONNX path, pool path, held-out inputs, extra arguments).
    """
    from tests.analysis_eval.tail_models import digits_split, labelled_classifier, train_mlp
    from tests.analysis_eval.task_models import autoencoder_score_model, digit_images, embedding_model
    from toco_core.demo.sensors import regression_model, sensor_split

    path, pool = folder / f"{arch}.onnx", folder / f"{arch}_pool.npz"
    extra: tuple[str, ...] = ("--budget", f"{TASK_BUDGET:.0%}")
    if arch == "regression":
        x, _, hx, _ = sensor_split()
        regression_model(path)
        extra += ("--task", "regression")
    elif arch == "score":
        x, _, hx, _ = digit_images()
        model = autoencoder_score_model(path)
        threshold = float(np.quantile(run_model(model, x), 0.9))  # flag the 10% worst reconstructed
        extra += ("--task", "score", "--threshold", repr(threshold))
    elif arch == "embedding":
        x, _, hx, _ = digit_images()
        x, hx = x.reshape(len(x), -1), hx.reshape(len(hx), -1)
        embedding_model(path)
        extra += ("--task", "embedding")  # normalised by ReduceL2 + Div, which detection does not take for one
    else:
        x, y, hx, _ = digits_split()
        labelled_classifier(train_mlp(x, y), path)
        np.savez(pool, x=x[:800], y=y[:800])
        return path, pool, hx, extra
    np.savez(pool, x=x[:800])
    return path, pool, hx, extra


def task_fidelity(model_path: Path, result_dir: Path, heldout: np.ndarray) -> dict:
    """Recompress an analysed task-kind model for TASK_PROFILE at TASK_BUDGET; its size and held-out fidelity.

    Returns the task kind, the plan's label, the compression ratio r = base file bytes / storage
    form bytes, and the held-out agreement 1 - d, d the share of ``heldout`` samples that
    disagree in the kind's metric (toco_core.task_kind.disagreement) between the base and the
    built model, both run at the scored tensor.
    """
    from toco_core.device import load_profile
    from toco_core.output_tail import fidelity_view
    from toco_core.plan import Policy
    from toco_core.recompress import recompress
    from toco_core.task_kind import disagreement

    model, result = load_model(model_path), load_result(result_dir)
    prof = load_profile(ROOT.parent / "deploy" / "profiles" / f"{TASK_PROFILE}.json")
    policy = Policy(budget=TASK_BUDGET, memory=prof.memory_budget, storage=prof.storage_budget,
                    latency_s=prof.latency_budget_s)
    built, report = recompress(model, result, prof, policy, measure_memory=False)
    scored = result.manifest.scored_output
    base_out = run_model(fidelity_view(model, scored), heldout)
    out = run_model(fidelity_view(built.runnable, scored), heldout)
    d = disagreement(result.task, base_out, out, result.manifest.output_kind)
    return {"task": result.task.kind.value, "plan": report.plan.label, "budget": TASK_BUDGET,
            "compression_ratio": report.base_file_bytes / report.storage_bytes,
            "storage_bytes": report.storage_bytes, "base_file_bytes": report.base_file_bytes,
            "self_test_disagreement": report.self_test.measured, "heldout_samples": len(heldout),
            "heldout_agreement": 1.0 - d}


def task_table(rows: list[dict]) -> Table:
    """Rich table of the task-kind rows: analysis cost, compression at the budget, held-out fidelity."""
    t = Table(title=f"task kinds: toco analyze at a {TASK_BUDGET:.0%} budget, then recompressed for the "
                    f"{TASK_PROFILE} profile",
              caption="ratio = base ONNX file / storage form; held-out agreement = 1 - share of held-out samples "
                      "disagreeing in the kind's metric (classifier: top-1; regression and score: relative error "
                      "> 0.1 sigma, or a flipped decision; embedding: cosine < 0.98)")
    for col in ("model", "task", "weights", "wall s", "CPU s", "load", "peak RSS MiB", "plan", "ratio",
                "held-out agreement (n)"):
        t.add_column(col, justify="left" if col in ("model", "plan") else "right")
    for r in rows:
        f = r["task_fidelity"]
        t.add_row(r["model"], f["task"], f"{r['weights']:,}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                  f"{r['load_avg_1min']:.1f}", f"{r['peak_rss_mb']:,.0f}", f["plan"],
                  f"{f['compression_ratio']:.1f}x", f"{f['heldout_agreement']:.2%} ({f['heldout_samples']})")
    return t


def timing_table(rows: list[dict]) -> Table:
    """Rich table of analysis cost per model."""
    t = Table(title="toco analyze: wall time and peak memory (whole command, 2 cores)",
              caption="CPU s = user + sys of the command; load = 1-min load average when it started; "
                      "peak RSS = the command's own high-water mark (kernel VmHWM); peak PSS = proportional "
                      "set size summed over its process tree (procs: the most processes seen), polled every 0.5 s; "
                      "the goal applies to the larger of the two; MiB")
    for col in ("model", "weights", "pool", "wall s", "CPU s", "load", "peak RSS MiB", "peak PSS MiB (procs)",
                "qbc / prune / calib s", "target", "pass/fail"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ph = r["timings"]
        target, rss_target = r["target_s"], r.get("rss_target_mib")
        goals = ([] if target is None else [f"< {target:.0f} s"]) + \
            ([] if rss_target is None else [f"< {rss_target:,.0f} MiB"])
        verdict = "-" if not goals else ("PASS" if r["passed"] else "FAIL")
        t.add_row(r["model"], f"{r['weights']:,}", f"{r.get('pool_size', 0):,}", f"{r['wall_s']:.1f}",
                  f"{r['cpu_s']:.1f}", f"{r['load_avg_1min']:.1f}", f"{r['peak_rss_mb']:,.0f}",
                  f"{r['peak_pss_mb']:,.0f} ({r['max_processes']})",
                  f"{ph['qbc']:.1f} / {ph['prune_rounds']:.1f} / {ph['calibrate']:.1f}",
                  ", ".join(goals) or "-", verdict)
    return t


def pruning_tables(pruning: dict) -> tuple[Table, Table]:
    """Rich tables: agreement at equal sparsity, then kept weights at 99% / 98% agreement."""
    a = Table(title="pruning without retraining: agreement with the base on 1000 held-out digits")
    a.add_column("model")
    a.add_column("method")
    for s in TABLE_SPARSITY:
        a.add_column(f"{s:.0%}", justify="right")
    k = Table(title="highest sparsity at an agreement threshold (2% grid, interpolated)")
    for col in ("model", "agreement", *METHODS, "kept ratio", "target", "pass/fail"):
        k.add_column(col, justify="left" if col == "model" else "right")
    for name, p in pruning.items():
        idx = [p["sparsity"].index(s) for s in TABLE_SPARSITY]
        for m in METHODS:
            a.add_row(name, m, *(f"{p['agreement'][m][i]:.1%}" for i in idx))
        for thr, v in p["verdicts"].items():
            k.add_row(name, f">= {float(thr):.0%}", *(f"{v['max_sparsity'][m]:.1%}" for m in METHODS),
                      f"{v['ratio']:.2f}x", f">= {v['target_ratio']:.1f}x", "PASS" if v["passed"] else "FAIL")
    return a, k


def main() -> None:
    """Parse --quick, run the analyses and the pruning comparison, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the ~5M-parameter CNN")
    parser.add_argument("--large", action="store_true", help="add the two 224x224 models (400-image pools)")
    parser.add_argument("--models", help=f"comma-separated rows to run (default: all selected by --quick and "
                                          f"--large) among {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "analysis.json", help="JSON results file")
    parser.add_argument("--rounding", choices=("compensated", "nearest"), default=None,
                        help="toco analyze --rounding (default: its default)")
    args = parser.parse_args()
    rounding = () if args.rounding is None else ("--rounding", args.rounding)
    archs = [a for a in MODELS if not (args.quick and a == "wide_cnn") and (args.large or a not in LARGE)]
    if args.models:
        archs = [a.strip() for a in args.models.split(",")]
        unknown = [a for a in archs if a not in MODELS]
        if unknown:
            parser.error(f"unknown models {unknown}; choose among {list(MODELS)}")
    heldout = mnist_splits().x_heldout
    timing, pruning = [], {}
    with tempfile.TemporaryDirectory(prefix="toco-bench-") as tmp:
        work = Path(tmp)
        pool = write_pool(work)
        for arch in archs:
            out = work / arch
            console.print(f"[bold]{MODELS[arch]}[/bold]: toco analyze ...")
            if arch in TASK_MODELS:
                path, task_pool, task_heldout, extra = task_case(arch, work)
                run = analyze_subprocess(path, task_pool, out, work / f"{arch}.log", extra=(*extra, *rounding))
            else:
                path = model_path(arch)
                run = analyze_subprocess(path, write_large_pool(arch, work) if arch in LARGE else pool, out,
                                         work / f"{arch}.log", extra=rounding)
            manifest = load_result(out).manifest
            target, rss_target = TIME_TARGET_S.get(arch), RSS_TARGET_MIB.get(arch)
            run["peak_memory_mb"] = max(run["peak_rss_mb"], run["peak_pss_mb"])
            passed = (target is None or run["wall_s"] < target) and \
                (rss_target is None or run["peak_memory_mb"] < rss_target)
            timing.append({"model": MODELS[arch], "arch": arch, "weights": manifest.weights, **run,
                           "timings": manifest.timings, "samples_used": manifest.samples_used,
                           "pool_size": manifest.pool_size, "qbc_rounds": len(manifest.rounds), "target_s": target,
                           "rss_target_mib": rss_target,
                           "passed": None if target is None and rss_target is None else passed})
            if arch in TASK_MODELS:
                console.print(f"[bold]{MODELS[arch]}[/bold]: recompress at the budget ...")
                timing[-1]["task_fidelity"] = task_fidelity(path, out, task_heldout)
            if arch in PRUNED_MODELS:
                console.print(f"[bold]{MODELS[arch]}[/bold]: pruning grid ...")
                curves = agreement_curves(path, out, heldout)
                pruning[MODELS[arch]] = {**curves, "verdicts": kept_verdicts(curves)}
    if any(r["arch"] not in TASK_MODELS for r in timing):
        console.print(timing_table([r for r in timing if r["arch"] not in TASK_MODELS]))
    if any(r["arch"] in TASK_MODELS for r in timing):
        console.print(task_table([r for r in timing if r["arch"] in TASK_MODELS]))
    for table in pruning_tables(pruning) if pruning else ():
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["bench/analysis.py", *sys.argv[1:]]), "cpus": os.cpu_count(),
              "heldout_digits": len(heldout), "analysis": timing, "pruning": pruning}
    args.out.write_text(json.dumps(report, indent=1))
    console.print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
