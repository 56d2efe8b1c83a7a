"""From a verified bundle on disk to an active model: recompress, gate, install, activate, swap.

Used by the daemon (with its engine and status messages) and by ``toco-agent recompress``
(no engine: the daemon notices the new pointer and swaps itself). Every step is written to
the deployment journal first, so a restart after kill -9 finishes or reports it; a
deployment is started at most ``MAX_ATTEMPTS`` times, then reported failed: never a loop.

Files under ``state_dir``: ``bundles/{bundle_id}.bundle`` (verified format-1 bundles, kept while
a slot uses them: the base model for the shadow run and for recompress/rollback), ``parts/
{bundle_id}/`` (the parts held of a parts bundle, agent.parts_store, kept on the same terms),
``references/{model_sha256}.json`` (drift reference per served model), ``jobs/current/`` (the
child's dir, removed once its candidate is installed).

A parts bundle is built from the parts its plan needs: the job runs with the parts held, and when
the next plan to try (the first, or a gentler one after a failed self-test) needs parts the box
lacks, the job stops, the deployer fetches exactly those (agent.parts_fetch) and runs it again.
The drift shadow is the fp32 base where the box holds it (format 1, or the optional ``base``
part), the master model where it holds every bit plane, else none (``shadow_mode``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.child_tasks import extract_file, master_model
from agent.config import AgentConfig
from agent.inference import InferenceEngine
from agent.model_store import CandidateMeta, ModelStore, SlotInfo, StoreError
from agent.parts_fetch import FetchClosed, FetchFailed, PartsFetcher
from agent.parts_store import PartsStore, dir_bytes
from agent.recompress_job import JobFailed, JobResult, JobSpec, NeedsParts, run_job
from agent.status import Journal, read_journal, write_journal
from toco_core.atomic_files import atomic_write
from toco_core.device import DeviceProfile, with_budgets
from toco_core.drift import DriftReference
from toco_core.errors import ModelError, TocoError
from toco_core.messages import BundleManifest, FailureReason, Phase, PlanSummary
from toco_core.plan import Policy
from toco_core.progress_reports import ProgressReports
from toco_core.runtime import input_dtype, make_session

log = logging.getLogger("toco.agent.deploy")
MAX_ATTEMPTS = 2
# what a box plans and self-tests with (codes/top: bundles whose planes hold every weight)
ALWAYS_PARTS = ("head", "codes/top", "calib/heldout")
Report = Callable[..., None]  # report(phase, journal, **StatusMessage fields)


def master_parts(listed: set[str]) -> set[str]:
    """The parts of a parts bundle (``listed``: its manifest's names) that build the master: every
    weight's codes and, in the band layout, every prune mask (they place the codes)."""
    banded = any(n.startswith("band/") for n in listed)
    return {n for n in listed if n.startswith(("codes/", "band/", "fine/")) or (banded and n.startswith("prune/"))}


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
        self.parts = PartsStore(self.root)
        self.fetcher: PartsFetcher | None = None  # set by the daemon once its link exists; None: fetch nothing

    # ---------------------------------------------------------------- files
    def bundle_path(self, bundle_id: str) -> Path:
        """Where a verified bundle is kept."""
        return self.root / "bundles" / f"{bundle_id}.bundle"

    def has_bundle(self, bundle_id: str) -> bool:
        """Whether the verified bundle is stored here (for a parts bundle: its signed manifest; parts
        a plan needs are fetched when it is built)."""
        return self.bundle_path(bundle_id).exists() or self.parts.has(bundle_id)

    def shadow_mode(self, bundle_id: str) -> str:
        """What the drift shadow runs for a bundle: ``fp32`` (the base is here: a format-1 bundle or the
        ``base`` part), ``master`` (every bit plane is here), or ``none``."""
        if self.bundle_path(bundle_id).exists():
            return "fp32"
        manifest = self.parts.manifest(bundle_id)
        if manifest is None:
            return "none"
        have = self.parts.have(bundle_id)
        if "base" in have:
            return "fp32"
        listed = {f.name for f in manifest.files}
        planes = master_parts(listed)
        return "master" if planes and planes | (set(ALWAYS_PARTS) & listed) <= have else "none"

    def storage_fields(self, bundle_id: str, received: int | None = None) -> dict[str, Any]:
        """StatusMessage fields on this box's storage: bytes received, state dir bytes, shadow mode."""
        return {"download_bytes": received, "state_dir_bytes": dir_bytes(self.root),
                "shadow": self.shadow_mode(bundle_id)}

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

    def save_reference(self, sha256: str, reference: DriftReference) -> None:
        """Replace the drift reference of a served model (a rebase), so a restart keeps it."""
        atomic_write(self.root / "references" / f"{sha256}.json", reference.model_dump_json().encode())

    def base_model(self, bundle_id: str) -> bytes | None:
        """The base model of a stored bundle (for the shadow run), None when the bundle is gone.

        Taken out of the bundle once by a child process (toco_core.bundle imports cryptography,
        which the daemon does not keep loaded) into ``bundles/{bundle_id}.base.onnx``.
        """
        bundle = self.bundle_path(bundle_id)
        if not bundle.exists():
            return self._parts_shadow(bundle_id)
        base = bundle.with_name(f"{bundle_id}.base.onnx")
        try:
            if not base.exists():
                extract_file(bundle, "model.onnx", base)
            return base.read_bytes()
        except (TocoError, OSError) as exc:  # a damaged bundle only disables the shadow run
            log.warning("no base model for the shadow run", extra={"fields": {"error": str(exc)}})
            return None

    def _parts_shadow(self, bundle_id: str) -> bytes | None:
        """The shadow of a parts bundle: the ``base`` part as it is, or the master model rebuilt in a child
        from every bit plane (never kept on disk: the state dir stays bounded); None in mode ``none``."""
        mode = self.shadow_mode(bundle_id)
        try:
            if mode == "fp32":
                return self.parts.path(bundle_id, "base").read_bytes()
            if mode == "master":
                out = self.root / "jobs" / f"shadow-{bundle_id[:16]}.onnx"
                try:
                    master_model(self.parts.dir(bundle_id), sorted(self.parts.have(bundle_id) - {"base"}), out)
                    return out.read_bytes()
                finally:
                    out.unlink(missing_ok=True)
        except (TocoError, OSError) as exc:  # damaged parts only disable the shadow run
            log.warning("no shadow model", extra={"fields": {"error": str(exc)}})
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
            self._fail(journal, Phase.FAILED, FailureReason.INTERNAL, "the verified bundle is missing on disk")
            return None
        if journal.attempts == 0:  # what this deployment receives is counted from here, across restarts
            journal = journal.model_copy(update={"received_before": self.parts.received(journal.bundle_id)})
        journal = journal.model_copy(update={"attempts": journal.attempts + 1, "phase": Phase.RECOMPRESSING.value})
        if journal.attempts > MAX_ATTEMPTS:
            self._fail(journal, Phase.FAILED, FailureReason.INTERNAL,
                       f"interrupted {MAX_ATTEMPTS} times (agent restarts); not trying again")
            return None
        write_journal(self.root, journal)
        self.report(Phase.RECOMPRESSING, journal, progress=0.0, detail=f"attempt {journal.attempts}")
        profile, policy = self.limits(journal.policy)
        spec = JobSpec(profile=profile, policy=policy, drift=self.config.drift,
                       measure_memory=policy.memory is not None)
        try:
            if self.bundle_path(journal.bundle_id).exists():
                bundle_path = str(self.bundle_path(journal.bundle_id))
                job = self._run(journal, spec.model_copy(update={"bundle_path": bundle_path}))
            else:
                job = self._run_parts(journal, spec, policy.max_tries)
                if self.config.keep_master:
                    self._fetch_master(journal)
        except FetchClosed:
            log.info("deployment paused: the agent is stopping; it resumes at the next start")
            return None
        except JobFailed as exc:
            self._fail(journal, Phase.FAILED, exc.reason, str(exc))
            return None
        summary = plan_summary(job)
        numbers = {"predicted_agreement": 1 - job.report.self_test.predicted,
                   "measured_agreement": 1 - job.report.self_test.measured, "plan": summary}
        self.report(Phase.SELF_TEST, journal, progress=1.0, detail="passed", **numbers)
        return self._activate(journal, job, summary, numbers)

    def _run(self, journal: Journal, spec: JobSpec) -> JobResult:
        """One recompression job in the child. Raises JobFailed."""
        progress = lambda stage, done, total: self.report(  # noqa: E731
            Phase.RECOMPRESSING, journal, progress=min(done / max(total, 1), 1.0), detail=stage)
        return run_job(spec, self.root / "jobs" / "current", self.config.recompress_memory,
                       self.config.recompress_timeout, progress)

    def _run_parts(self, journal: Journal, spec: JobSpec, max_tries: int) -> JobResult:
        """Build from parts: run the job with the parts held; when it stops at a plan needing parts not
        here, fetch exactly those and run it again (at most once per plan it may try, plus one).

        Raises JobFailed (a failed fetch with its reason), FetchClosed when the agent stops meanwhile.
        """
        bid = journal.bundle_id
        manifest = self.parts.manifest(bid)
        if manifest is None:
            raise JobFailed(FailureReason.INTERNAL, "the parts manifest is missing on disk")
        listed = {f.name for f in manifest.files}
        names = [n for n in ALWAYS_PARTS if n in listed]
        for _ in range(max_tries + 2):
            self._fetch(journal, manifest, names)
            have = sorted(self.parts.have(bid) & listed)
            try:
                parts_spec = spec.model_copy(update={"parts_dir": str(self.parts.dir(bid)), "parts": have})
                return self._run(journal, parts_spec)
            except NeedsParts as exc:
                names = exc.parts
        raise JobFailed(FailureReason.INTERNAL, f"the plans still needed parts after {max_tries + 2} fetches: "
                        f"{', '.join(names)}")

    def _fetch_master(self, journal: Journal) -> None:
        """Fetch the weight parts the plan did not need (config ``keep_master``), so the shadow is the
        master. A failed fetch only leaves the box without a shadow: it is logged, never raised
        (but for FetchClosed, the agent stopping)."""
        manifest = self.parts.manifest(journal.bundle_id)
        if manifest is None or self.shadow_mode(journal.bundle_id) != "none":
            return
        try:
            self._fetch(journal, manifest, sorted(master_parts({f.name for f in manifest.files})))
        except JobFailed as exc:
            log.warning("no master for the shadow: its parts did not arrive", extra={"fields": {"error": str(exc)}})

    def _fetch(self, journal: Journal, manifest: BundleManifest, names: list[str]) -> None:
        """Fetch the named parts that are not here. Raises JobFailed (with the fetch's reason, or
        bad_command when there is no fetcher, e.g. ``toco-agent recompress`` from a shell), FetchClosed."""
        sizes = {f.name: f.size for f in manifest.files}
        missing = [n for n in names if n not in self.parts.have(manifest.bundle_id)]
        if not missing:
            return
        if self.fetcher is None:
            raise JobFailed(FailureReason.BAD_COMMAND,
                            f"the plan needs parts this box does not hold ({', '.join(missing)}: "
                            f"{sum(sizes.get(n, 0) for n in missing)} bytes) and this process has no fleet link",
                            "send the recompress from the fleet server (toco-fleet / the API): the daemon fetches them")
        wanted = sum(sizes.get(n, 0) for n in missing)
        self.report(Phase.DOWNLOADING, journal, progress=0.0, detail=f"fetching {', '.join(missing)} ({wanted} bytes)")
        reports = ProgressReports(time.monotonic())

        def progress(here: int, total: int) -> None:
            share = here / max(total, 1)
            if reports.due(share, time.monotonic()):
                self.report(Phase.DOWNLOADING, journal, progress=share)

        try:
            self.fetcher.fetch(manifest, missing, progress)
        except FetchFailed as exc:
            raise JobFailed(exc.reason, str(exc)) from None

    def _activate(self, journal: Journal, job: JobResult, summary: PlanSummary,
                  numbers: dict[str, Any]) -> SlotInfo | None:
        return self.activate(journal, job.candidate.read_bytes(), summary, numbers, job.reference, job.preprocessing)

    def activate(self, journal: Journal, data: bytes, summary: PlanSummary, numbers: dict[str, Any],
                 reference: DriftReference | None = None,
                 preprocessing: dict[str, Any] | None = None) -> SlotInfo | None:
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
            # every input in its own dtype: a uint8 camera model refuses float zeros
            session.run(None, {inp.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in inp.shape],
                                                  input_dtype(inp)) for inp in session.get_inputs()})
        except ModelError as exc:
            self._fail(journal, Phase.FAILED, FailureReason.LOAD_FAILED, str(exc))
            return None
        except Exception as exc:  # onnxruntime's run errors share no base class
            self._fail(journal, Phase.FAILED, FailureReason.RUNTIME_ERROR, f"candidate failed a test run: {exc}")
            return None
        sha = hashlib.sha256(data).hexdigest()
        if reference is not None:
            atomic_write(self.root / "references" / f"{sha}.json", reference.model_dump_json().encode())
        try:
            slot = self.store.install_candidate(data, CandidateMeta(
                bundle_id=journal.bundle_id, plan_summary=summary.model_dump(mode="json"), preprocessing=preprocessing))
            self._pause(Phase.ACTIVATING)  # fault injection: the window between install and the pointer switch
            info = self.store.activate(slot)
        except StoreError as exc:
            self._fail(journal, Phase.FAILED, FailureReason.NO_DISK if "disk" in (exc.hint or "") else
                       FailureReason.INTERNAL, str(exc))
            return None
        if self.engine is not None:
            try:
                self.engine.load(data, info.version, info.meta.preprocessing, trial=self.config.trial_runs,
                                 context=journal)
            except ModelError as exc:
                self._roll_back(f"load failed: {exc}")
                self._fail(journal, Phase.ROLLED_BACK, FailureReason.LOAD_FAILED, str(exc))
                return None
        self.on_activated(info)
        write_journal(self.root, None)
        # the state dir keeps the two slots, the parts to re-derive from and the drift references only
        shutil.rmtree(self.root / "jobs" / "current", ignore_errors=True)
        self.collect_garbage()
        received = self.parts.received(journal.bundle_id) - journal.received_before
        if self.bundle_path(journal.bundle_id).exists():  # format 1: the container, when this deployment fetched it
            received = self.bundle_path(journal.bundle_id).stat().st_size if journal.kind == "deploy" else 0
        self.report(Phase.ACTIVE, journal, progress=1.0, detail=f"slot {info.slot}: {summary.label}", **numbers,
                    **self.storage_fields(journal.bundle_id, max(received, 0)))
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
            info, _ = self.store.verify(slot)
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
        for bundle_id in self.parts.bundles():
            if bundle_id not in keep_bundles:
                self.parts.remove(bundle_id)
