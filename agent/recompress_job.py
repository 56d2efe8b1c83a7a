"""Local recompression in a CHILD process with a memory bound, so the agent is never OOM-killed.

Parent (``run_job``): writes ``job.json`` into a fresh job dir, starts
``python -m agent.recompress_job JOB_DIR``, forwards the child's progress lines, and a psutil
watchdog kills the child (and its children) when their summed RSS passes the limit or the
time runs out. The child dies with the parent (PR_SET_PDEATHSIG), so a kill -9 of the agent
leaves no orphan writing into the state dir.

Child (``_child_main``): opens the bundle (a format-1 container, or the parts of a parts bundle
held in the state dir, checked again against the signed manifest), runs
``toco_core.recompress.recompress`` with the box's profile and policy, builds the drift
reference from the candidate's outputs on the calibration samples, and writes
``candidate.onnx``, ``reference.json`` and last
``result.json`` (the commit mark), each atomically. An expected failure (infeasible,
self-test, bad bundle) is written to ``error.json`` with its FailureReason. From parts, the
search stops at the first plan that needs parts the box does not hold: ``error.json`` then
names them (``needs``), the parent raises NeedsParts, fetches them and runs the job again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil
from pydantic import BaseModel, ConfigDict

from toco_core.atomic_files import atomic_write
from toco_core.device import DeviceProfile
from toco_core.drift import DriftReference, DriftSettings
from toco_core.errors import TocoError
from toco_core.messages import FailureReason
from toco_core.plan import CompressionPlan, CompressionReport, Policy

if TYPE_CHECKING:  # the child imports these where it needs them
    from toco_core.analysis_result import AnalysisResult
    from toco_core.model_bundle import BundleInfo
    from toco_core.weight_source import WeightSource

log = logging.getLogger("toco.agent.recompress")
Progress = Callable[[str, int, int], None]


class JobSpec(BaseModel):
    """What the child needs: the bundle file (format 1) or the parts folder and the parts held there
    (parts bundles), this box's profile and the policy."""

    model_config = ConfigDict(extra="forbid")

    bundle_path: str | None = None
    parts_dir: str | None = None
    parts: list[str] = []
    profile: DeviceProfile
    policy: Policy
    drift: DriftSettings = DriftSettings()
    measure_memory: bool = False


class JobFailed(TocoError):
    """Raised when recompression did not produce a candidate; ``reason`` is the wire code."""

    def __init__(self, reason: FailureReason, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.reason = reason


class NeedsParts(JobFailed):
    """The next plan to try needs parts this box does not hold; ``parts`` names them."""

    def __init__(self, parts: list[str], message: str) -> None:
        super().__init__(FailureReason.INTERNAL, message, "fetch them and run the job again")
        self.parts = parts


@dataclass(frozen=True)
class JobResult:
    """A candidate that passed the self-test in the child: its file, report and drift reference."""

    candidate: Path
    report: CompressionReport
    reference: DriftReference
    model_name: str
    peak_rss: int
    preprocessing: dict[str, Any] | None = None


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def _kill_tree(proc: psutil.Process) -> None:
    try:
        kids = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [*kids, proc]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the agent dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def run_job(spec: JobSpec, job_dir: Path, memory_limit: int, timeout: float,
            progress: Progress = lambda *a: None) -> JobResult:
    """Recompress in a child process bounded to ``memory_limit`` bytes of RSS and ``timeout`` s.

    Returns the JobResult. Raises JobFailed: no_memory (limit hit), infeasible,
    self_test_failed, bad_manifest (unusable bundle) or internal (crash, timeout).
    """
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    atomic_write(job_dir / "job.json", spec.model_dump_json().encode())
    child = subprocess.Popen([sys.executable, "-m", "agent.recompress_job", str(job_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent, cwd=os.getcwd())
    proc = psutil.Process(child.pid)
    err_tail: list[bytes] = []
    stderr = child.stderr
    assert stderr is not None  # stderr=PIPE
    threading.Thread(target=lambda: err_tail.extend(stderr.readlines()[-20:]), daemon=True).start()
    threading.Thread(target=_forward_progress, args=(child.stdout, progress), daemon=True).start()
    peak, start, verdict = 0, time.monotonic(), None
    while child.poll() is None:
        rss = _tree_rss(proc)
        peak = max(peak, rss)
        if rss > memory_limit:
            verdict = JobFailed(FailureReason.NO_MEMORY, f"recompression used {rss >> 20} MiB, the limit is "
                                f"{memory_limit >> 20} MiB; it was stopped", "raise recompress_memory or the box's RAM")
        elif time.monotonic() - start > timeout:
            verdict = JobFailed(FailureReason.INTERNAL,
                                f"recompression took longer than {timeout:.0f} s; it was stopped",
                                "raise recompress_timeout")
        if verdict is not None:
            _kill_tree(proc)
            child.wait(10)
            raise verdict
        time.sleep(0.05)
    return _collect(job_dir, child.returncode, peak, b"".join(err_tail))


def _forward_progress(stream: IO[bytes], progress: Progress) -> None:
    for line in stream:
        try:
            event = json.loads(line)
            progress(str(event["stage"]), int(event["done"]), int(event["total"]))
        except (ValueError, KeyError, TypeError):
            continue
        except Exception:  # the callback is the daemon's: never kill the reader thread
            log.exception("progress callback failed")


def _collect(job_dir: Path, code: int, peak: int, stderr: bytes) -> JobResult:
    if (job_dir / "error.json").exists():
        err = json.loads((job_dir / "error.json").read_text())
        if err.get("needs"):
            raise NeedsParts(list(err["needs"]), err["message"])
        raise JobFailed(FailureReason(err["reason"]), err["message"])
    if code != 0 or not (job_dir / "result.json").exists():
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {code}"]
        raise JobFailed(FailureReason.INTERNAL, f"recompression child failed: {tail[0][:300]}",
                        "see the agent log; report it with the bundle id")
    result = json.loads((job_dir / "result.json").read_text())
    return JobResult(job_dir / "candidate.onnx", CompressionReport.model_validate(result["report"]),
                     DriftReference.model_validate_json((job_dir / "reference.json").read_bytes()),
                     result["model_name"], peak, result.get("preprocessing"))


# ----------------------------------------------------------------------------- child side
def _emit(stage: str, done: int, total: int) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)


class _Missing(TocoError):
    """Raised in the child before building a plan whose parts are not here."""

    def __init__(self, parts: list[str]) -> None:
        super().__init__(f"the plan needs parts not on this box: {', '.join(parts)}")
        self.parts = parts


def _open_parts(spec: JobSpec,
                ) -> tuple[WeightSource, AnalysisResult, BundleInfo, Callable[[CompressionPlan], None]]:
    """(WeightSource, analysis, info, before_build) from the parts held, re-checked against the signed
    manifest. Raises BundleError for a damaged or unlisted part."""
    from toco_core.messages import MessageKind, parse_message
    from toco_core.parts_bundle import BundleHead, source_from_parts, verify_parts

    folder = Path(spec.parts_dir)  # type: ignore[arg-type]
    manifest = parse_message(MessageKind.MANIFEST, (folder / "manifest.json").read_bytes())
    parts = {n: (folder / n).read_bytes() for n in spec.parts}
    verify_parts(parts, manifest)
    source, analysis, info = source_from_parts(parts)
    head = BundleHead(parts["head"])

    def before_build(plan: CompressionPlan) -> None:
        missing = [n for n in head.parts_for_plan(plan) if n not in parts]
        if missing:
            raise _Missing(missing)

    return source, analysis, info, before_build


def _child_main(job_dir: Path) -> int:
    from toco_core.bundle import unpack_bundle
    from toco_core.drift import build_reference
    from toco_core.errors import AnalysisError, BundleError, InfeasibleError, SelfTestError
    from toco_core.model_bundle import open_bundle
    from toco_core.onnx_model import model_bytes, output_kind
    from toco_core.output_tail import fidelity_view
    from toco_core.recompress import recompress
    from toco_core.runtime import run_model

    spec = JobSpec.model_validate_json((job_dir / "job.json").read_bytes())
    try:
        _emit("open", 0, 1)
        if spec.parts_dir is not None:
            model, analysis, info, before_build = _open_parts(spec)
            base = model.reference
        else:
            model, analysis, info = open_bundle(unpack_bundle(Path(spec.bundle_path).read_bytes()))  # type: ignore[arg-type]
            base, before_build = model, None
        built, report = recompress(model, analysis, spec.profile, spec.policy, progress=_emit,
                                   measure_memory=spec.measure_memory, before_build=before_build)
        _emit("reference", 0, 1)
        runnable = model_bytes(built.runnable)
        # the drift reference holds the scored tensor, as the self-test measured it
        scored = analysis.manifest.scored_output
        outputs = run_model(fidelity_view(built.runnable, scored), analysis.heldout_x)
        reference = build_reference(analysis.heldout_x, outputs, 1.0 - report.self_test.measured, spec.drift,
                                    output_kind(fidelity_view(base, scored)), scored_output=scored,
                                    task=analysis.manifest.task)
    except _Missing as exc:
        atomic_write(job_dir / "error.json", json.dumps({"reason": FailureReason.INTERNAL.value, "message": str(exc),
                                                         "needs": exc.parts}).encode())
        return 3
    except (InfeasibleError, SelfTestError, BundleError, AnalysisError) as exc:
        # AnalysisError: an analysis made before plan tables (schema 1), which no box can build from
        reason = (FailureReason.INFEASIBLE if isinstance(exc, InfeasibleError) else
                  FailureReason.SELF_TEST_FAILED if isinstance(exc, SelfTestError) else FailureReason.BAD_MANIFEST)
        atomic_write(job_dir / "error.json", json.dumps({"reason": reason.value, "message": str(exc)}).encode())
        return 3
    except TocoError as exc:
        atomic_write(job_dir / "error.json",
                     json.dumps({"reason": FailureReason.INTERNAL.value, "message": str(exc)}).encode())
        return 3
    atomic_write(job_dir / "candidate.onnx", runnable)
    atomic_write(job_dir / "reference.json", reference.model_dump_json().encode())
    atomic_write(job_dir / "result.json", json.dumps({"report": report.model_dump(mode="json"),
                                                      "model_name": info.model_name,
                                                      "preprocessing": info.preprocessing.model_dump(mode="json")
                                                      if info.preprocessing else None}).encode())
    _emit("done", 1, 1)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))
