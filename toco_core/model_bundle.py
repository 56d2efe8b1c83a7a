"""What a TOCO bundle holds, and how it turns back into a model + analysis on the box.

Files of a bundle (packed by toco_core.bundle)::

    model.onnx                      the base model
    analysis/manifest.json          toco_core.analysis_result layout
    analysis/tolerance.safetensors
    analysis/calibration.json
    analysis/samples.npz
    bundle.json                     BundleInfo: model name, fleet budget, preprocessing
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toco_core.analysis_result import FILES, OPTIONAL_FILES, AnalysisResult, load_result
from toco_core.errors import BundleError
from toco_core.onnx_model import load_model, model_hash
from toco_core.preprocessing import Preprocessing


class BundleInfo(BaseModel):
    """The bundle's own description (bundle.json)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    format: int = Field(1, ge=1, le=2,
                        description="1: fp32 model + analysis directory; 2: parts (toco_core.parts_bundle)")
    model_name: str
    model_sha256: str
    analysis_id: str | None = None
    budget: float = Field(0.01, gt=0, lt=1, description="fleet fidelity budget")
    preprocessing: Preprocessing | None = None
    reason: str = Field("initial", description="why this bundle exists: initial, drift re-analysis, ...")


def bundle_files(model_path: Path, analysis_dir: Path, info: BundleInfo) -> dict[str, bytes]:
    """Collect the files of a bundle from a model file and an analysis directory."""
    files = {"model.onnx": Path(model_path).read_bytes(), "bundle.json": info.model_dump_json().encode()}
    present = [f for f in OPTIONAL_FILES if (Path(analysis_dir) / f).is_file()]
    for name in ("manifest.json", *FILES, *present):
        files[f"analysis/{name}"] = (Path(analysis_dir) / name).read_bytes()
    return files


def open_bundle(files: dict[str, bytes]) -> tuple[onnx.ModelProto, AnalysisResult, BundleInfo]:
    """Check and load a bundle's files: the base model, its analysis (hash-verified), the info.

    Raises BundleError naming the missing or inconsistent part.
    """
    missing = [n for n in ("model.onnx", "bundle.json", "analysis/manifest.json", *(f"analysis/{f}" for f in FILES))
               if n not in files]
    if missing:
        raise BundleError(f"bundle lacks {', '.join(missing)}", "rebuild it on the fleet server")
    try:
        info = BundleInfo.model_validate_json(files["bundle.json"])
    except ValidationError as exc:
        raise BundleError(f"bundle.json is malformed: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    model = load_model(files["model.onnx"])
    if model_hash(files["model.onnx"]) != info.model_sha256 and model_hash(model) != info.model_sha256:
        raise BundleError("bundle's model does not match the hash in bundle.json", "rebuild the bundle")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            if name.startswith("analysis/"):
                (Path(tmp) / name.split("/", 1)[1]).write_bytes(data)
        try:
            result = load_result(Path(tmp))
        except Exception as exc:
            raise BundleError(f"bundle's analysis is unusable: {exc}", "rebuild the bundle") from None
    if result.manifest.model_sha256 != model_hash(model):
        raise BundleError("bundle's analysis was made for another model", "re-run the analysis")
    return model, result, info
