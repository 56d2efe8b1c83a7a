"""The analysis result directory: what the server ships and a device compresses from.

    OUT/manifest.json          AnalysisManifest: model hash, settings, QBC rounds, timings, file hashes
    OUT/tolerance.safetensors  ToleranceMap (log-quantized, no pickle)
    OUT/calibration.json       measured CalibrationCurve per operator
    OUT/samples.npz            calibration samples: the QBC analysis set and the held-out set
                               (analysis_x/NAME, heldout_x/NAME per input for several inputs)
    OUT/plans.safetensors      PlanTable: master steps and every curve point's build decisions
    OUT/bias_deltas.safetensors  optional: every point's corrected-bias deltas as the calibration
                               fitted them, so no build fits them again (absent: builds fit them)
    OUT/rounding.parts         with compensated rounding only: every point's code differences, as
                               the parts boxes fetch (toco_core.rounding_parts); builds add them

Numpy only: the agent reads it too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from toco_core import __version__
from toco_core.atomic_files import atomic_write
from toco_core.bias_parts import PointDeltas, load_point_deltas, save_point_deltas
from toco_core.calibration import CalibrationCurve
from toco_core.errors import AnalysisError
from toco_core.fidelity import OutputKind
from toco_core.model_inputs import Batch, from_arrays, to_arrays
from toco_core.plan_table import PlanTable, load_plan_table, save_plan_table
from toco_core.rounding_parts import PointRounding, load_point_rounding, save_point_rounding
from toco_core.task_kind import CLASSIFIER, TaskSpec
from toco_core.tolerance_map import ToleranceMap, load_tolerance_map, save_tolerance_map

# 2: nested quantiser (plans.safetensors); a schema-1 analysis must be re-run
SCHEMA_VERSION = 2
FILES = ("tolerance.safetensors", "calibration.json", "samples.npz", "plans.safetensors")
BIAS_DELTAS_FILE = "bias_deltas.safetensors"
ROUNDING_FILE = "rounding.parts"
OPTIONAL_FILES = (BIAS_DELTAS_FILE, ROUNDING_FILE)  # read and hash-checked where the manifest lists them


class RoundStats(BaseModel):
    """One QBC round: the set size, the committee scale and what the selection achieved."""

    round: int
    samples: int
    committee_scale: float
    committee_disagreement_heldout: float
    selected_score_mean: float
    random_score_mean: float
    tolerance_change: float | None = None
    seconds: float


class AnalysisManifest(BaseModel):
    """Everything about an analysis except the arrays."""

    schema_version: int = SCHEMA_VERSION
    toco_version: str = __version__
    created_at: float = Field(default_factory=time.time)
    model_name: str
    model_sha256: str
    input_name: str
    input_shape: list[int | None]
    output_kind: OutputKind
    # the tensor every fidelity figure is measured on (toco_core.output_tail); None in analyses made
    # before output selection, which scored the first graph output
    scored_output: str | None = None
    weights: int
    settings: dict[str, Any]
    rounds: list[RoundStats]
    samples_used: int
    pool_size: int
    heldout_size: int
    base_accuracy: float | None = None
    timings: dict[str, float]
    tensors: list[dict[str, Any]]
    files: dict[str, str] = {}
    # the task kind and its metric's numbers (toco_core.task_kind); None: a classifier, as every
    # analysis made before task kinds
    task: TaskSpec | None = None


@dataclass(frozen=True)
class AnalysisResult:
    """The loaded directory: manifest, tolerance map, curves, calibration samples."""

    manifest: AnalysisManifest
    tolerances: ToleranceMap | None  # None on a box that built from parts: the plan table decides instead
    curves: dict[str, CalibrationCurve]
    analysis_x: Batch  # an array, or one per input name for a model with several (toco_core.model_inputs)
    heldout_x: Batch
    heldout_y: np.ndarray | None = None
    plans: PlanTable | None = None
    # the plan table's points' bias deltas as the calibration fitted them (toco_core.bias_parts); None:
    # an analysis made before they were kept, or without bias correction
    bias_deltas: PointDeltas | None = None
    # with compensated rounding: every plan table point's code differences (toco_core.rounding_parts)
    rounding: PointRounding | None = None

    @property
    def task(self) -> TaskSpec:
        """The task kind every fidelity figure of this analysis is measured in (a classifier when unsaid)."""
        return self.manifest.task or CLASSIFIER

    @property
    def bias_correction(self) -> bool:
        """Whether the curves were measured with bias correction, so a device must build with it.

        Analyses from before the setting existed measured without it.
        """
        return bool(self.manifest.settings.get("bias_correction", False))

    @property
    def compensated_rounding(self) -> bool:
        """Whether the curves were measured with compensated codes, so a build must add each point's
        code differences (toco_core.rounding_parts) to its nested codes."""
        return bool(self.manifest.settings.get("compensated_rounding", False))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_result(result: AnalysisResult, out: Path) -> Path:
    """Write the directory atomically enough: arrays first, manifest (with file hashes) last."""
    out.mkdir(parents=True, exist_ok=True)
    if result.tolerances is None:
        raise ValueError("only an analysis with its tolerance map can be saved")
    save_tolerance_map(result.tolerances, out / "tolerance.safetensors")
    (out / "calibration.json").write_text(json.dumps({k: c.model_dump() for k, c in result.curves.items()}, indent=1))
    arrays = {**to_arrays("analysis_x", result.analysis_x), **to_arrays("heldout_x", result.heldout_x)}
    if result.heldout_y is not None:
        arrays["heldout_y"] = result.heldout_y
    np.savez_compressed(out / "samples.npz", **arrays)  # type: ignore[arg-type]  # numpy: **kwds may name allow_pickle
    if result.plans is None:
        raise AnalysisError("the analysis has no plan table", "re-run the analysis with this version")
    save_plan_table(result.plans, out / "plans.safetensors")
    files = list(FILES)
    (out / BIAS_DELTAS_FILE).unlink(missing_ok=True)
    if result.bias_deltas:
        save_point_deltas(result.bias_deltas, out / BIAS_DELTAS_FILE)
        files.append(BIAS_DELTAS_FILE)
    (out / ROUNDING_FILE).unlink(missing_ok=True)
    if result.rounding is not None:
        save_point_rounding(result.rounding, out / ROUNDING_FILE)
        files.append(ROUNDING_FILE)
    manifest = result.manifest.model_copy(update={"files": {f: _sha(out / f) for f in files}})
    atomic_write(out / "manifest.json", manifest.model_dump_json(indent=1).encode())
    return out


def load_result(path: Path, verify: bool = True) -> AnalysisResult:
    """Read an analysis directory, checking the schema and (by default) every file hash.

    Raises AnalysisError naming the missing, corrupt or mismatching part.
    """
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise AnalysisError(f"{path} is not an analysis result (no manifest.json)", "run `toco analyze ... -o DIR`")
    try:
        manifest = AnalysisManifest.model_validate_json(mpath.read_text())
    except ValidationError as exc:
        raise AnalysisError(f"{mpath} is malformed: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise AnalysisError(f"{path} has schema {manifest.schema_version}, this TOCO reads {SCHEMA_VERSION}",
                            "re-run the analysis with this version")
    for f in (*FILES, *(f for f in OPTIONAL_FILES if f in manifest.files)):
        if not (path / f).is_file():
            raise AnalysisError(f"{path} lacks {f}", "re-run the analysis")
        if verify and manifest.files.get(f) != _sha(path / f):
            raise AnalysisError(f"{path / f} does not match its hash in the manifest (corrupt or edited)",
                                "re-run the analysis or fetch the bundle again")
    try:
        raw_curves = json.loads((path / "calibration.json").read_text())
        curves = {k: CalibrationCurve.model_validate(v) for k, v in raw_curves.items()}
        with np.load(path / "samples.npz", allow_pickle=False) as z:
            ax, hx = from_arrays("analysis_x", z), from_arrays("heldout_x", z)
            hy = z.get("heldout_y")
    except (ValueError, KeyError, OSError, ValidationError) as exc:
        raise AnalysisError(f"{path} has an unreadable part: {exc}", "re-run the analysis") from None
    deltas = load_point_deltas(path / BIAS_DELTAS_FILE) if BIAS_DELTAS_FILE in manifest.files else None
    rounding = load_point_rounding(path / ROUNDING_FILE) if ROUNDING_FILE in manifest.files else None
    if rounding is None and manifest.settings.get("compensated_rounding", False):
        # without them every build would be refused later, naming a part a server cannot fetch
        raise AnalysisError(f"{path} was analysed with compensated rounding but lacks its code differences "
                            f"({ROUNDING_FILE} is not in its manifest)", "re-run the analysis")
    return AnalysisResult(manifest, load_tolerance_map(path / "tolerance.safetensors"), curves, ax, hx, hy,
                          plans=load_plan_table(path / "plans.safetensors"), bias_deltas=deltas, rounding=rounding)
