"""Classifiers with a post-processing tail (ArgMax + label lookup, ZipMap) and two outputs:
the analysis scores the probabilities, the device model keeps every original output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.drift_reporter import scored_values
from agent.inference import InferenceEngine
from agent.inference_api import jsonable_outputs
from tests.analysis_eval.tail_models import (
    digits_split,
    labelled_classifier,
    train_mlp,
    weighted_tail_classifier,
    zipmap_classifier,
)
from toco_core.analysis.pipeline import analyze
from toco_core.analysis.settings import AnalysisSettings
from toco_core.device import load_profile
from toco_core.errors import ModelError
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import model_bytes, model_hash
from toco_core.output_tail import detect_scored_output, fidelity_view, scored_output
from toco_core.parts_bundle import pack_parts, source_from_parts
from toco_core.plan import Policy
from toco_core.recompress import recompress

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"
FAST = AnalysisSettings(initial_samples=32, samples_per_round=32, max_rounds=2, max_heldout=200, prune_rounds=1,
                        prune_round_samples=32, committee_members=4, budget=0.02)


@pytest.fixture(scope="module")
def data():
    return digits_split()


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("tails")
    net = train_mlp(data[0], data[1])
    return {
        "labelled": (labelled_classifier(net, root / "labelled.onnx"), root / "labelled.onnx"),
        "zipmap": (zipmap_classifier(net, root / "zipmap.onnx"), root / "zipmap.onnx"),
        "weighted": (weighted_tail_classifier(net, root / "weighted.onnx"), None),
    }


def _outputs(data: bytes) -> list[tuple[str, str]]:
    return [(o.name, o.type) for o in ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_outputs()]


def _labels(data: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["label"], {"features": x})[0]


def test_auto_detection_scores_the_probabilities(models):
    assert detect_scored_output(models["labelled"][0]) == "probabilities"  # the float output of the pair
    assert detect_scored_output(models["zipmap"][0]) == "probs"  # the float tensor that feeds ZipMap and ArgMax
    assert scored_output(models["zipmap"][0], "probs") == "probs"


def test_unknown_or_weighted_output_is_a_clear_error(models):
    with pytest.raises(ModelError, match="'nope' is no tensor .*outputs: label, probabilities"):
        scored_output(models["labelled"][0], "nope")
    with pytest.raises(ModelError, match="come after the scored output 'probabilities'"):
        scored_output(models["weighted"][0])


def _logits(model) -> str:
    return next(n.input[0] for n in model.graph.node if n.op_type == "Softmax")


@pytest.mark.parametrize("variant,profile,explicit", [("labelled", "handheld", False), ("zipmap", "camera-box", False),
                                                      ("labelled", "line-pc", True)])
def test_analyse_recompress_keeps_the_tail_and_the_labels(models, data, variant, profile, explicit):
    model, _ = models[variant]
    pool_x, pool_y, test_x, _ = data
    output = _logits(model) if explicit else None  # explicit: score the logits before the Softmax
    result = analyze(model, pool_x, pool_y, FAST.model_copy(update={"output": output}), model_name=variant)
    assert result.manifest.scored_output == (output or detect_scored_output(model))
    assert result.manifest.output_kind == ("logits" if explicit else "probs")
    built, report = recompress(model, result, load_profile(PROFILES / f"{profile}.json"),
                               Policy(budget=0.02), measure_memory=False)
    assert report.self_test.passed
    device = model_bytes(built.runnable)
    assert _outputs(device) == _outputs(model_bytes(model))  # every output, its name and type
    agree = (_labels(device, test_x) == _labels(model_bytes(model), test_x)).mean()
    assert agree >= 0.95, agree
    # the device model's head is the compressed sub-graph: the tail is carried, not re-analysed
    scored = result.manifest.scored_output
    head = fidelity_view(built.runnable, scored)
    assert [o.name for o in head.graph.output] == [scored]
    _serve(device, test_x, scored, served=scored == "probabilities")  # the logits are internal
    if variant == "zipmap":  # a box that holds only the bundle's parts builds the same outputs
        parts = pack_parts(model, result, BundleInfo(model_name=variant, model_sha256=model_hash(model), budget=0.02))
        source, from_parts, _ = source_from_parts(parts)
        assert from_parts.manifest.scored_output == scored
        built, report = recompress(source, from_parts, load_profile(PROFILES / f"{profile}.json"),
                                   Policy(budget=0.02), measure_memory=False)
        assert report.self_test.passed and _outputs(model_bytes(built.runnable)) == _outputs(model_bytes(model))


def _serve(device: bytes, x, scored: str, served: bool) -> None:
    """The agent's engine returns every output; drift observes the scored one where it is served."""
    engine = InferenceEngine()
    engine.load(device, "v1")
    outputs = engine.infer(x[:3]).outputs
    assert list(outputs) == ["label", "probabilities"]
    body = json.loads(json.dumps(jsonable_outputs(outputs)))
    assert body["label"][0].startswith("digit-")
    values = scored_values(outputs, scored)
    if served:
        assert values is not None and values.shape == (3, 10)
    else:  # internal (ZipMap'd probabilities, logits): drift is not fed label strings or maps
        assert values is None and len(body["probabilities"]) == 3


def test_cli_unknown_output_is_one_line(models, data, tmp_path):
    _, path = models["zipmap"]
    pool = tmp_path / "pool.npy"
    np.save(pool, data[0][:100])
    bad = subprocess.run([sys.executable, "-m", "toco_cli", "analyze", str(path), "--pool", str(pool),
                          "-o", str(tmp_path / "bad"), "--output", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--output 'nope' is no tensor" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()
