"""Parts bundles on the demo CNN: every plan built from its parts is the server's build, bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toco_core.analysis_result import save_result
from toco_core.bundle import generate_private_key, make_manifest, pack_bundle, unpack_bundle, verify_manifest
from toco_core.compression.nested import prune_level
from toco_core.errors import AnalysisError, BundleError
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import compressible_weights, model_bytes, model_hash
from toco_core.parts_bundle import BundleHead, _unlz, pack_parts, source_from_parts, verify_parts
from toco_core.plan_build import build
from toco_core.solver import enumerate_plans
from toco_core.weight_bands import band_names


@pytest.fixture(scope="module")
def parts(lenet5, lenet5_analysis):
    info = BundleInfo(model_name="lenet5", model_sha256=model_hash(lenet5))
    return pack_parts(lenet5, lenet5_analysis, info)


def _initializers(model):
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


@pytest.mark.parametrize(("name", "bounds"), [("lenet5", None), ("mlp", None), ("lenet5", [9, 4, 3])])
def test_every_plan_on_the_curve_grid_builds_bit_identically_from_its_parts(name, bounds, request):
    """Conv + Gemm (LeNet-5) and Gemm only (the MLP): fp32 at every point, int8/nbits per prune level;
    with every level a band bound and with three bounds (plans at, between, above and below them)."""
    lenet5, lenet5_analysis = request.getfixturevalue(name), request.getfixturevalue(f"{name}_analysis")
    parts = pack_parts(lenet5, lenet5_analysis, BundleInfo(model_name=name, model_sha256=model_hash(lenet5)),
                       band_bounds=bounds)
    head = BundleHead(parts["head"])
    plans = enumerate_plans(lenet5_analysis, compressible_weights(lenet5), len(model_bytes(lenet5)), 0.4, True)
    sources = {}
    checked, built = set(), 0
    for plan in plans:
        if plan.runtime != "fp32" and (plan.prune_scale, plan.runtime) in checked:
            continue  # int8/nbits: one point per prune level keeps the test short; fp32: every point
        checked.add((plan.prune_scale, plan.runtime))
        built += 1
        need = tuple(head.parts_for_plan(plan))
        if need not in sources:
            sources[need] = source_from_parts({n: parts[n] for n in need})
        source, result, _ = sources[need]
        if plan.prune_scale == 0 and plan.quant_scale == 0:
            # the base plan: the server's is the fp32 base; a box without the optional fp32 part
            # runs the master (every bit plane), whose disagreement the curves measured at the floor
            assert not source.is_base and build(source, result, plan).runnable is source.reference
            continue
        server, box = build(lenet5, lenet5_analysis, plan), build(source, result, plan)
        assert _initializers(box.runnable) == _initializers(server.runnable), plan.label
        assert box.storage == server.storage, plan.label
    assert built > 40


def test_an_aggressive_plan_downloads_only_the_codes_of_the_weights_it_keeps(lenet5, lenet5_analysis, parts):
    head = BundleHead(parts["head"])
    plans = enumerate_plans(lenet5_analysis, compressible_weights(lenet5), len(model_bytes(lenet5)))
    smallest = max((p for p in plans if p.prune_scale > 0), key=lambda p: (p.prune_scale, -p.predicted_storage))
    gentlest = next(p for p in plans if p.prune_scale == 0 and p.quant_scale == head.table.master_scale)
    small, full = head.parts_for_plan(smallest), head.parts_for_plan(gentlest)
    level, levels = prune_level(head.table.prune_grid, smallest.prune_scale), len(head.table.prune_grid)
    # the unpruned master reads every class's codes and every mask (to place them)
    assert {n for n in parts if n.startswith(("codes/", "prune/"))} <= set(full)
    # the aggressive plan: the masks down to its level, the bands of the classes it keeps
    assert sorted(n for n in small if n.startswith("prune/")) == sorted(f"prune/{j}" for j in range(level, levels))
    kept = {int(n.split("/")[1]) for n in small if n.startswith("band/")}
    assert kept == set(range(level + 1, levels + 1))
    assert [n for n in small if n.startswith("bias/")] == [f"bias/{level}"]
    weights = lambda names: sum(len(parts[n]) for n in names if not n.startswith("calib/"))  # noqa: E731
    assert weights(small) < 0.4 * weights(parts)
    # a box may stop above a tensor's top bit: a plan whose octaves are all coarse skips the fine bits
    top_bits = head.layout.top_bits or []
    assert any(top_bits)
    assert not any(n.startswith("fine/") for n in band_names(levels, level, top_bits, top_bits))
    master = band_names(levels, level, [0] * len(top_bits), top_bits)
    assert {n for n in master if n.startswith("fine/")} == {f"fine/{c}/{b}" for c in range(level + 1, levels + 1)
                                                          for b in range(max(top_bits))}
    one = [max(t - 1, 0) for t in top_bits]  # one bit below each top: the fine part of that bit only
    assert {n.split("/")[2] for n in band_names(levels, level, one, top_bits) if n.startswith("fine/")} \
        == {str(t - 1) for t in top_bits if t > 0}


def test_a_bundle_laid_out_for_a_fleet_costs_its_boxes_one_split(lenet5, lenet5_analysis, parts):
    """Bounds at the fleet's levels: a box at a bound reads the bounds at and above its level and the
    bands above it; a box between bounds reads its group's band and the splits inside it."""
    head = BundleHead(parts["head"])
    levels = len(head.table.prune_grid)
    bounds = [levels // 2, 2]
    laid = pack_parts(lenet5, lenet5_analysis, BundleInfo(model_name="lenet5", model_sha256=model_hash(lenet5)),
                      band_bounds=bounds)
    lhead = BundleHead(laid["head"])
    assert lhead.layout.band_bounds == bounds
    # laid out with every level a bound, the layout names no bounds: agents from before bounds open it
    assert b"band_bounds" not in unpack_bundle(_unlz(parts["head"], "head"))["ladder.json"]
    plans = enumerate_plans(lenet5_analysis, compressible_weights(lenet5), len(model_bytes(lenet5)))
    at = next(p for p in plans if prune_level(head.table.prune_grid, p.prune_scale) == bounds[0])
    names = lhead.parts_for_plan(at)
    assert [n for n in names if n.startswith("prune/")] == [f"prune/{bounds[0]}"]
    assert [n for n in names if n.startswith("band/")] == [f"band/{levels}"]
    weights = lambda ps, ns: sum(len(ps[n]) for n in ns if not n.startswith("calib/"))  # noqa: E731
    # five splits fewer for one merged band: under 0.85x of the bytes on the machines before, 0.856x with the
    # demo LeNet-5 as trained on an AMD EPYC (its weights, so its codes, differ in the last bits); ~1x without bounds
    assert weights(laid, names) < 0.9 * weights(parts, head.parts_for_plan(at))
    between = next(p for p in plans if prune_level(head.table.prune_grid, p.prune_scale) == bounds[0] + 1)
    names = lhead.parts_for_plan(between)
    splits = [bounds[0], *range(levels - 1, bounds[0], -1)]
    assert [n for n in names if n.startswith("prune/")] == [f"prune/{j}" for j in splits]
    assert [n for n in names if n.startswith("band/")] == [f"band/{levels}"]
    below = next(p for p in plans if prune_level(head.table.prune_grid, p.prune_scale) == 0)
    names = lhead.parts_for_plan(below)
    assert [n for n in names if n.startswith("band/")] == [f"band/{levels}", f"band/{bounds[0]}", "band/2"]
    assert {f"prune/{j}" for j in (*bounds, 0, 1)} <= set(names)
    with pytest.raises(ValueError, match="not levels"):
        pack_parts(lenet5, lenet5_analysis, BundleInfo(model_name="lenet5", model_sha256=model_hash(lenet5)),
                   band_bounds=[levels])


def test_bundles_packed_with_bit_planes_of_every_weight_still_open(lenet5, lenet5_analysis, parts):
    """Bundles packed before bands (a bit plane per tensor, a prune tree) decode to the same builds."""
    old = pack_parts(lenet5, lenet5_analysis, BundleInfo(model_name="lenet5", model_sha256=model_hash(lenet5)),
                     planes_layout="tensor")
    head, new_head = BundleHead(old["head"]), BundleHead(parts["head"])
    assert head.layout.plane_parts == "tensor" and "codes/top" in old and "codes/top" not in parts
    plans = enumerate_plans(lenet5_analysis, compressible_weights(lenet5), len(model_bytes(lenet5)))
    for plan in [p for p in plans if p.prune_scale > 0][::9]:
        a = build(*source_from_parts({n: old[n] for n in head.parts_for_plan(plan)})[:2], plan)
        b = build(*source_from_parts({n: parts[n] for n in new_head.parts_for_plan(plan)})[:2], plan)
        assert _initializers(a.runnable) == _initializers(b.runnable), plan.label


def test_a_tampered_part_is_refused(parts):
    key = generate_private_key()
    manifest = make_manifest(pack_bundle(parts), private_key=key)
    verify_manifest(manifest, key.public_key())
    verify_parts(parts, manifest)
    bad = dict(parts)
    raw = bytearray(bad["prune/5"])
    raw[len(raw) // 2] ^= 0x40
    bad["prune/5"] = bytes(raw)
    with pytest.raises(BundleError, match="'prune/5'.*does not match its signed hash"):
        verify_parts(bad, manifest)
    with pytest.raises(BundleError, match="not in bundle"):
        verify_parts({"codes/99": b"x"}, manifest)


def test_missing_parts_are_named(parts):
    with pytest.raises(BundleError, match="lack calib/heldout"):
        source_from_parts({"head": parts["head"], "prune/11": parts["prune/11"]})
    with pytest.raises(BundleError, match="head"):
        source_from_parts({**parts, "head": parts["head"][:100]})


def test_a_plan_without_its_bias_part_says_which_to_fetch(lenet5, lenet5_analysis, parts):
    head = BundleHead(parts["head"])
    p, q = next(pt for pt in head.table.points if pt[0] > 0)
    plan = next(pl for pl in enumerate_plans(lenet5_analysis, compressible_weights(lenet5), len(model_bytes(lenet5)))
                if (pl.prune_scale, pl.quant_scale) == (p, q))
    needed = head.parts_for_plan(plan)
    source, result, _ = source_from_parts({n: parts[n] for n in needed if not n.startswith("bias/")})
    with pytest.raises(AnalysisError, match="are not on this box"):
        build(source, result, plan)
    damaged = {n: parts[n] for n in needed}
    bias = next(n for n in needed if n.startswith("bias/"))
    damaged[bias] = damaged[bias][:-7]
    with pytest.raises(BundleError, match=bias):
        source_from_parts(damaged)


def test_toco_pack_and_recompress_from_the_bundle(tmp_path, lenet5_path, lenet5_analysis):
    analysis = save_result(lenet5_analysis, tmp_path / "analysis")
    bundle = tmp_path / "lenet5.bundle"
    toco = [sys.executable, "-m", "toco_cli"]
    done = subprocess.run([*toco, "pack", str(lenet5_path), "--analysis", str(analysis), "-o", str(bundle)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "weights part" in done.stdout and bundle.stat().st_size > 0
    # an fp32-only box: whether nbits or int8 passes the p50 gate depends on a noisy timing, which
    # would let the two runs pick different runtimes for the same point
    profile = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "profiles" / "line-pc.json").read_text())
    (tmp_path / "fp32-box.json").write_text(json.dumps({**profile, "formats": ["fp32"]}))
    reports = {}
    for how, args in (("bundle", ["--bundle", str(bundle)]),
                      ("model", [str(lenet5_path), "--analysis", str(analysis)])):
        out = tmp_path / how / "model.onnx"
        done = subprocess.run([*toco, "recompress", *args, "-o", str(out), "--storage", "20KB", "--objective", "size",
                               "--profile", str(tmp_path / "fp32-box.json")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "transfer" not in done.stdout and "download" in done.stdout
        reports[how] = json.loads(out.with_suffix(".report.json").read_text())
    a, b = reports["bundle"], reports["model"]
    assert a["plan"] == b["plan"] and a["storage_bytes"] == b["storage_bytes"]
    assert a["download_bytes"] == b["download_bytes"] < a["bundle_bytes"] <= bundle.stat().st_size
    assert a["self_test"]["measured"] == b["self_test"]["measured"]
    done = subprocess.run([*toco, "recompress", "-o", str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert done.returncode == 2 and "give either MODEL --analysis DIR or --bundle" in done.stderr
    assert "Traceback" not in done.stderr
