"""From a verified bundle on disk to an active model: recompress, gate, install, activate, swap.

Used by the daemon (with its engine and status messages) and by ``toco-agent recompress``
(no engine: the daemon notices the new pointer and swaps itself). Every step is written to
the deployment journal first, so a restart after kill -9 finishes or reports it; a
deployment is started at most ``MAX_ATTEMPTS`` times, then reported failed: never a loop.

Files under ``state_dir``: ``bundles/{bundle_id}.bundle`` (verified bundles, kept while a slot
uses them: the base model for the shadow run and for recompress/rollback), ``references/
{model_sha256}.json`` (drift reference per served model), ``jobs/current/`` (the child's dir).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.child_tasks import extract_file
from agent.config import AgentConfig
from agent.inference import InferenceEngine
from agent.model_store import CandidateMeta, ModelStore, SlotInfo, StoreError
from agent.recompress_job import JobFailed, JobResult, JobSpec, run_job
from agent.atomic_files import atomic_write
from agent.status import Journal, read_journal, write_journal
from toco_core.device import DeviceProfile, with_budgets
from toco_core.drift import DriftReference
from toco_core.errors import ModelError, TocoError
from toco_core.messages import FailureReason, Phase, PlanSummary
from toco_core.plan import Policy
from toco_core.runtime import make_session

log = logging.getLogger("toco.agent.deploy")
MAX_ATTEMPTS = 2
Report = Callable[..., None]  # report(phase, journal, **StatusMessage fields)


def plan_summary(job: JobResult) -> PlanSummary:
    """The plan summary carried in status, state and the slot's meta: the report's predictions and
    measurements, the model's name and the recompression child's peak RSS."""
    return PlanSummary.from_report(job.report, model_name=job.model_name, recompress_peak_rss=job.peak_rss)


class Deployer:
    """Runs deployments one at a time (the caller serialises calls)."""

    def __init__(self, config: AgentConfig, store: ModelStore, profile: Callable[[], DeviceProfile],
                 report: Report, engine: InferenceEngine | None = None,
                 on_activated: Callable[[SlotInfo], None] | None = None) -> None:
        self.config, self.store, self.profile, self.report = config, store, profile, report
        self.engine, self.on_activated = engine, on_activated or (lambda info: None)
        self.root = Path(config.state_dir)
        for sub in ("bundles", "references", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- files
    def bundle_path(self, bundle_id: str) -> Path:
        """Where a verified bundle is kept."""
        return self.root / "bundles" / f"{bundle_id}.bundle"

    def has_bundle(self, bundle_id: str) -> bool:
        """Whether the verified bundle is stored here."""
        return self.bundle_path(bundle_id).exists()

    def save_bundle(self, bundle_id: str, data: bytes) -> None:
        """Keep verified bundle bytes (atomic write)."""
        atomic_write(self.bundle_path(bundle_id), data)

    def reference_for(self, sha256: str) -> DriftReference | None:
        """The drift reference of a served model, None when unknown."""
        path = self.root / "references" / f"{sha256}.json"
        try:
            return DriftReference.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            return None

    def base_model(self, bundle_id: str) -> bytes | None:
        """The base model of a stored bundle (for the shadow run), None when the bundle is gone.

        Taken out of the bundle once by a child process (toco_core.bundle imports cryptography,
        which the daemon does not keep loaded) into ``bundles/{bundle_id}.base.onnx``.
        """
        bundle = self.bundle_path(bundle_id)
        if not bundle.exists():
            return None
        base = bundle.with_name(f"{bundle_id}.base.onnx")
        try:
            if not base.exists():
                extract_file(bundle, "model.onnx", base)
            return base.read_bytes()
        except (TocoError, OSError) as exc:  # a damaged bundle only disables the shadow run
            log.warning("no base model for the shadow run", extra={"fields": {"error": str(exc)}})
            return None

    def limits(self, overrides: dict[str, Any] | None = None) -> tuple[DeviceProfile, Policy]:
        """This box's profile with the configured caps, and the policy; ``overrides`` (memory_bytes,
        storage_bytes, latency_ms, fidelity_budget from a command) replace config values."""
        o = overrides or {}
        c = self.config
        memory = o.get("memory_bytes") or c.memory_cap
        storage = o.get("storage_bytes") or c.storage_cap
        latency = o["latency_ms"] / 1e3 if o.get("latency_ms") else c.latency_cap
        profile = with_budgets(self.profile(), memory=memory, storage=storage, latency_s=latency)
        policy = Policy(budget=o.get("fidelity_budget") or c.fidelity_budget, memory=memory, storage=storage,
                        latency_s=latency, objective=c.objective)
        return profile, policy

    # ---------------------------------------------------------------- the pipeline
    def deploy(self, journal: Journal) -> SlotInfo | None:
        """Recompress the journal's bundle, gate, install, activate and swap; returns the new SlotInfo.

        Every failure is reported (never raised) and leaves the serving model as it was;
        returns None then.
        """
        if not self.has_bundle(journal.bundle_id):
            return self._fail(journal, Phase.FAILED, FailureReason.INTERNAL, "the verified bundle is missing on disk")
        journal = journal.model_copy(update={"attempts": journal.attempts + 1, "phase": Phase.RECOMPRESSING.value})
        if journal.attempts > MAX_ATTEMPTS:
            return self._fail(journal, Phase.FAILED, FailureReason.INTERNAL,
                              f"interrupted {MAX_ATTEMPTS} times (agent restarts); not trying again")
        write_journal(self.root, journal)
        self.report(Phase.RECOMPRESSING, journal, progress=0.0, detail=f"attempt {journal.attempts}")
        profile, policy = self.limits(journal.policy)
        spec = JobSpec(bundle_path=str(self.bundle_path(journal.bundle_id)), profile=profile, policy=policy,
                       drift=self.config.drift, measure_memory=policy.memory is not None)
        progress = lambda stage, done, total: self.report(  # noqa: E731
            Phase.RECOMPRESSING, journal, progress=min(done / max(total, 1), 1.0), detail=stage)
        try:
            job = run_job(spec, self.root / "jobs" / "current", self.config.recompress_memory,
                          self.config.recompress_timeout, progress)
        except JobFailed as exc:
            return self._fail(journal, Phase.FAILED, exc.reason, str(exc))
        summary = plan_summary(job)
        numbers = {"predicted_agreement": 1 - job.report.self_test.predicted,
                   "measured_agreement": 1 - job.report.self_test.measured, "plan": summary}
        self.report(Phase.SELF_TEST, journal, progress=1.0, detail="passed", **numbers)
        return self._activate(journal, job, summary, numbers)

    def _activate(self, journal: Journal, job: JobResult, summary: PlanSummary, numbers: dict) -> SlotInfo | None:
        return self.activate(journal, job.candidate.read_bytes(), summary, numbers, job.reference, job.preprocessing)

    def activate(self, journal: Journal, data: bytes, summary: PlanSummary, numbers: dict,
                 reference: DriftReference | None = None, preprocessing: dict | None = None) -> SlotInfo | None:
        """Test-run, install, switch to and serve a candidate that passed its self-test.

        ``summary`` is the plan summary kept in the slot, ``numbers`` extra StatusMessage fields.
        The served model goes on trial (config ``trial_runs``). Returns the new SlotInfo, or None
        after reporting why it was not activated.
        """
        journal = journal.model_copy(update={"phase": Phase.ACTIVATING.value})
        write_journal(self.root, journal)
        self.report(Phase.ACTIVATING, journal, **numbers)
        try:  # a candidate that does not load or run here is never activated
            session = make_session(data, self.config.threads)
            inp = session.get_inputs()[0]
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            session.run(None, {inp.name: np.zeros(shape, np.float32)})
        except ModelError as exc:
            return self._fail(journal, Phase.FAILED, FailureReason.LOAD_FAILED, str(exc))
        except Exception as exc:  # onnxruntime's run errors share no base class
            return self._fail(journal, Phase.FAILED, FailureReason.RUNTIME_ERROR, f"candidate failed a test run: {exc}")
        sha = hashlib.sha256(data).hexdigest()
        if reference is not None:
            atomic_write(self.root / "references" / f"{sha}.json", reference.model_dump_json().encode())
        try:
            slot = self.store.install_candidate(data, CandidateMeta(
                bundle_id=journal.bundle_id, plan_summary=summary.model_dump(mode="json"), preprocessing=preprocessing))
            self._pause(Phase.ACTIVATING)  # fault injection: the window between install and the pointer switch
            info = self.store.activate(slot)
        except StoreError as exc:
            return self._fail(journal, Phase.FAILED, FailureReason.NO_DISK if "disk" in (exc.hint or "") else
                              FailureReason.INTERNAL, str(exc))
        if self.engine is not None:
            try:
                self.engine.load(data, info.version, info.meta.preprocessing, trial=self.config.trial_runs,
                                 context=journal)
            except ModelError as exc:
                self._roll_back(f"load failed: {exc}")
                return self._fail(journal, Phase.ROLLED_BACK, FailureReason.LOAD_FAILED, str(exc))
        self.on_activated(info)
        write_journal(self.root, None)
        self.report(Phase.ACTIVE, journal, progress=1.0, detail=f"slot {info.slot}: {summary.label}", **numbers)
        self.collect_garbage()
        return info

    def _roll_back(self, reason: str) -> None:
        try:
            self.store.rollback(reason)
        except StoreError as exc:
            log.error("rollback failed", extra={"fields": {"error": str(exc)}})
        if self.engine is not None:
            try:
                info, data = self.store.load_active_bytes()
                self.engine.load(data, info.version, info.meta.preprocessing)
                self.on_activated(info)
            except (StoreError, ModelError) as exc:
                log.error("no model to serve after rollback", extra={"fields": {"error": str(exc)}})
                self.engine.unload()

    def _fail(self, journal: Journal, phase: Phase, reason: FailureReason, detail: str) -> None:
        log.warning("deployment failed", extra={"fields": {"bundle": journal.bundle_id[:12], "reason": reason.value,
                                                           "detail": detail}})
        write_journal(self.root, None)
        self.report(phase, journal, reason=reason, detail=detail[:2000])
        return None

    def _pause(self, phase: Phase) -> None:
        seconds = self.config.fault_pause.get(phase.value)
        if seconds:
            time.sleep(seconds)

    # ---------------------------------------------------------------- restart
    def resume(self) -> Journal | None:
        """After a restart: finish or report the journal's deployment.

        Returns the journal when its bundle is still downloading (the downloader resumes it),
        else None (the deployment was finished, re-run or reported here).
        """
        journal = read_journal(self.root)
        if journal is None:
            return None
        if journal.phase in (Phase.RECEIVED.value, Phase.DOWNLOADING.value) and not self.has_bundle(journal.bundle_id):
            return journal
        active = self.store.active()
        if journal.phase == Phase.ACTIVATING.value and active and active.meta.bundle_id == journal.bundle_id \
                and journal.kind == "deploy":
            write_journal(self.root, None)
            self.report(Phase.ACTIVE, journal, progress=1.0, detail=f"slot {active.slot} (finished before a restart)",
                        plan=active.meta.plan)
            return None
        self.deploy(journal)
        return None

    def collect_garbage(self) -> None:
        """Delete stored bundles and references no slot uses any more."""
        keep_bundles, keep_refs = set(), set()
        for slot in ("a", "b"):
            info, _ = self.store.verify(slot)  # type: ignore[arg-type]
            if info is not None:
                keep_bundles.add(info.meta.bundle_id)
                keep_refs.add(info.meta.sha256)
        journal = read_journal(self.root)
        if journal is not None:
            keep_bundles.add(journal.bundle_id)
        for path in [*(self.root / "bundles").glob("*.bundle"), *(self.root / "bundles").glob("*.base.onnx")]:
            if path.name.split(".")[0] not in keep_bundles:
                path.unlink(missing_ok=True)
        for path in (self.root / "references").glob("*.json"):
            if path.stem not in keep_refs:
                path.unlink(missing_ok=True)
