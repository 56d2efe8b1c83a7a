import json

import numpy as np
import pytest

from toco_core.analysis_result import load_result, save_result
from toco_core.errors import AnalysisError
from toco_core.onnx_model import read_weights


def test_calibration_curves_are_monotone_and_cover_the_budget(lenet5_analysis):
    for name in ("prune", "quantize"):
        curve = lenet5_analysis.curves[name]
        dis = [p.disagreement for p in curve.points]
        assert dis == sorted(dis), name
        assert dis[0] <= 0.01 < dis[-1], f"{name}: the grid must straddle the 1% budget"
    prune = lenet5_analysis.curves["prune"].points
    # prune points keep the master codes (docs/bundles.md): the prune scale is the share the prune ranks
    # zero, and the master rounds some survivors to 0 on top (the same share at every point, at most
    # the master's own zeros)
    scale = lenet5_analysis.plans.master_scale
    master_zeros = next(p.sparsity for p in lenet5_analysis.curves["master"].points
                        if p.quant_scale == pytest.approx(scale))
    for p in prune:
        assert p.prune_scale - 0.01 <= p.sparsity <= p.prune_scale + master_zeros + 0.01, (p.prune_scale, p.sparsity)
    assert [p.sparsity for p in prune] == sorted(p.sparsity for p in prune)


def test_qbc_selects_samples_the_committee_disputes_more_than_random(lenet5_analysis):
    rounds = lenet5_analysis.manifest.rounds
    assert len(rounds) >= 2
    for r in rounds:
        assert r.selected_score_mean > 1.5 * r.random_score_mean
    assert lenet5_analysis.manifest.samples_used == len(lenet5_analysis.analysis_x)


def test_tolerance_pruning_keeps_agreement_where_magnitude_pruning_loses_it(lenet5, lenet5_analysis, digits):
    """At 70% sparsity the tolerance order keeps >= 98.5% agreement on unseen digits, and beats global magnitude."""
    from toco_core.fidelity import compare_outputs
    from toco_core.onnx_model import with_weights
    from toco_core.runtime import run_model

    w = read_weights(lenet5)
    base = run_model(lenet5, digits.x_heldout)
    ranks = lenet5_analysis.tolerances.prune_rank
    tol = {k: np.where(ranks[k] <= 0.7, 0, v).astype(np.float32) for k, v in w.items()}
    t = np.quantile(np.concatenate([np.abs(v).ravel() for v in w.values()]), 0.7)
    mag = {k: np.where(np.abs(v) <= t, 0, v).astype(np.float32) for k, v in w.items()}
    a_tol = compare_outputs(base, run_model(with_weights(lenet5, tol), digits.x_heldout)).agreement
    a_mag = compare_outputs(base, run_model(with_weights(lenet5, mag), digits.x_heldout)).agreement
    assert a_tol >= 0.985
    assert a_tol > a_mag


def test_result_directory_round_trip_and_corruption(lenet5_analysis, tmp_path):
    out = save_result(lenet5_analysis, tmp_path / "res")
    back = load_result(out)
    assert back.manifest.model_sha256 == lenet5_analysis.manifest.model_sha256
    for k, tau in lenet5_analysis.tolerances.quant.items():
        rel = np.abs(np.log2(np.maximum(back.tolerances.quant[k], 1e-30)) - np.log2(np.maximum(tau, 1e-30)))
        assert rel[tau > 0].max() < 0.2  # log-quantized to 255 levels per tensor
        np.testing.assert_allclose(back.tolerances.prune_rank[k], lenet5_analysis.tolerances.prune_rank[k], atol=2e-5)
    np.testing.assert_array_equal(back.heldout_x, lenet5_analysis.heldout_x)
    # a flipped byte in the tolerance map is caught by the manifest hash
    f = out / "tolerance.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(AnalysisError, match="does not match its hash"):
        load_result(out)
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(AnalysisError, match="malformed"):
        load_result(out)


def test_a_split_pool_is_held_once_and_analyses_as_the_pool_does(lenet5, lenet5_analysis, digits):
    """Split first, drop the pool: no whole pool stays alive in the analysis, the candidates are
    freed once QBC has picked from them, and the result is the one the pool itself gives."""
    import weakref

    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.pool_split import split_pool
    from toco_core.analysis.settings import AnalysisSettings

    settings = AnalysisSettings(max_rounds=3, samples_per_round=48, initial_samples=48)  # as lenet5_analysis
    pool = digits.x_pool.copy()
    split = split_pool(pool, settings)
    assert np.array_equal(np.sort(np.concatenate([split.held, split.cand])), np.arange(len(pool)))
    assert np.array_equal(split.held_x, pool[split.held]) and np.array_equal(split.cand_x, pool[split.cand])
    pool_ref = weakref.ref(pool)
    del pool
    seen = []

    def progress(phase: str, done: int, total: int) -> None:
        seen.append((phase, pool_ref() is None, split.cand_x is None))

    result = analyze(lenet5, split, digits.y_pool, settings, progress, model_name="lenet5")
    assert seen and all(freed for _, freed, _ in seen), "something in the analysis kept the whole pool"
    assert all(taken for phase, _, taken in seen if phase in ("prune", "calibrate"))
    assert result.manifest.pool_size == len(digits.x_pool)
    assert np.array_equal(result.heldout_x, lenet5_analysis.heldout_x)
    assert np.array_equal(result.analysis_x, lenet5_analysis.analysis_x)
    for name, tau in lenet5_analysis.tolerances.quant.items():
        assert np.array_equal(result.tolerances.quant[name], tau), name
        assert np.array_equal(result.tolerances.prune_rank[name], lenet5_analysis.tolerances.prune_rank[name]), name
    assert result.curves == lenet5_analysis.curves
