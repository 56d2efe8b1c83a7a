"""The fleet's commands that change the served model: deploy, recompress, rollback, plus the
automatic rollback of a model that fails during its trial runs.

Handlers run on the link's dispatcher thread (or an inference request thread) and must stay
short: they validate, write the journal and queue the real work for the agent's one worker, so
model changes happen one at a time and in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.bundle_download import BundleDownloader
from agent.command_guard import CommandGuard
from agent.config import AgentConfig
from agent.deployer import Deployer
from agent.drift_reporter import DriftReporter
from agent.inference import InferenceEngine
from agent.model_store import ModelStore, SlotInfo, StoreError
from agent.status import Journal, read_journal, write_journal
from agent.status_report import StatusReport
from toco_core.errors import ModelError, PoolError
from toco_core.messages import (
    BundleManifest,
    DeployCommand,
    FailureReason,
    Message,
    Phase,
    RebaseDriftCommand,
    RecompressCommand,
    RollbackCommand,
    ServerCommand,
    UploadSamplesCommand,
)

log = logging.getLogger("toco.agent")


class ModelCommands:
    """Turns commands and failures into jobs for the agent's worker.

    Takes the agent's parts, ``enqueue`` (queues a job for the worker), ``attach`` (points drift
    and the link at a newly served slot) and a getter for the downloader, which exists only once
    the agent started. A job that fails is reported to the fleet as a status message, not raised.
    ``guard`` admits a command first (signature, device, expiry, replay: agent.command_guard).
    """

    def __init__(self, config: AgentConfig, store: ModelStore, engine: InferenceEngine, deployer: Deployer,
                 reporter: DriftReporter, status: StatusReport, enqueue: Callable[[Callable[[], object]], None],
                 attach: Callable[[SlotInfo], None], downloader: Callable[[], BundleDownloader | None],
                 guard: CommandGuard) -> None:
        self.config, self.store, self.engine, self.deployer = config, store, engine, deployer
        self.reporter, self.status = reporter, status
        self._enqueue, self._attach, self._downloader = enqueue, attach, downloader
        self.guard = guard

    # ---------------------------------------------------------------- dispatcher thread
    def on_command(self, topic: str, cmd: Message) -> None:
        """Link handler for the device's command topic: admit (or refuse), validate and queue; the
        worker does the work."""
        log.info("command", extra={"fields": {"cmd": type(cmd).__name__, "id": getattr(cmd, "cmd_id", "")}})
        if not isinstance(cmd, ServerCommand) or not self.guard.admit(cmd):
            return
        if isinstance(cmd, DeployCommand):
            self._deploy(cmd.deployment_id, cmd.bundle_id, cmd.fidelity_budget)
        elif isinstance(cmd, RollbackCommand) and cmd.bundle_id is not None:
            self._rollback_to(cmd)
        elif isinstance(cmd, RecompressCommand):
            self._enqueue(lambda: self._recompress(cmd))
        elif isinstance(cmd, RollbackCommand):
            self._enqueue(lambda: self._rollback(cmd))
        elif isinstance(cmd, UploadSamplesCommand):
            self.reporter.upload(cmd)
        elif isinstance(cmd, RebaseDriftCommand):
            self._enqueue(lambda: self._rebase_drift(cmd))

    def _rebase_drift(self, cmd: RebaseDriftCommand) -> None:
        """Worker: rebase the drift reference on the field windows and keep it with the served model."""
        active = self.store.active()
        try:
            reference = self.reporter.rebase(cmd.windows)
        except PoolError as exc:
            log.warning("drift reference not rebased", extra={"fields": {"cmd": cmd.cmd_id, "error": str(exc)}})
            return
        if active is not None:
            self.deployer.save_reference(active.meta.sha256, reference)
        log.info("drift reference rebased on field windows", extra={"fields": {"cmd": cmd.cmd_id,
                                                                              "reason": cmd.reason}})

    def _deploy(self, deployment_id: str, bundle_id: str, fidelity_budget: float | None) -> None:
        policy = {"fidelity_budget": fidelity_budget} if fidelity_budget else {}
        journal = Journal(deployment_id=deployment_id, bundle_id=bundle_id, policy=policy)
        if self.deployer.has_bundle(bundle_id):
            # stored here earlier (say, the previous slot's): its manifest is not checked again, its sequence is
            downgrade = self.guard.trust.stored_downgrade(bundle_id)
            if downgrade is not None:
                self.status.report(Phase.REFUSED, journal, reason=FailureReason.DOWNGRADE, detail=downgrade)
                return
            write_journal(self.config.state_dir, journal)
            self.status.report(Phase.VERIFIED, journal, progress=1.0, detail="bundle already stored here")
            self._enqueue(lambda: self.deployer.deploy(journal))
        else:
            write_journal(self.config.state_dir, journal)
            downloader = self._downloader()
            assert downloader is not None, "the daemon starts the downloader before it takes commands"
            downloader.download(bundle_id, deployment_id)

    def _rollback_to(self, cmd: RollbackCommand) -> None:
        """A signed rollback naming a bundle: allow it although it is older, then deploy it: from the copy
        stored here (the previous slot's bundle is kept) or downloaded and admitted like any bundle."""
        self.guard.trust.allow_rollback(cmd.bundle_id)  # type: ignore[arg-type]
        self._deploy(cmd.deployment_id or cmd.cmd_id, cmd.bundle_id, None)  # type: ignore[arg-type]

    def on_bundle(self, manifest: BundleManifest, data: bytes) -> None:
        """Downloader callback (dispatcher thread): keep the verified bytes, queue the deployment."""
        self.deployer.save_bundle(manifest.bundle_id, data)
        journal = read_journal(self.config.state_dir)
        if journal is None or journal.bundle_id != manifest.bundle_id:
            log.info("bundle stored without a deployment waiting for it")
            return
        journal = journal.model_copy(update={"phase": Phase.VERIFIED.value})
        write_journal(self.config.state_dir, journal)
        self._enqueue(lambda: self.deployer.deploy(journal))

    def on_parts(self, manifest: BundleManifest, deployment_id: str | None) -> None:
        """Downloader callback (dispatcher thread): a parts bundle's signed manifest was admitted; keep it
        and queue the deployment, which fetches the parts its plan needs."""
        self.deployer.parts.save_manifest(manifest)
        journal = read_journal(self.config.state_dir)
        if journal is None or journal.bundle_id != manifest.bundle_id:
            log.info("parts manifest stored without a deployment waiting for it")
            return
        journal = journal.model_copy(update={"phase": Phase.DOWNLOADING.value})
        write_journal(self.config.state_dir, journal)
        self._enqueue(lambda: self.deployer.deploy(journal))

    def on_download_failed(self, bundle_id: str, reason: FailureReason, detail: str) -> None:
        """Downloader callback: close the deployment waiting for ``bundle_id`` and show the failure in status.json.

        The downloader already reported the failure to the fleet.
        """
        journal = read_journal(self.config.state_dir)
        if journal is not None and journal.bundle_id == bundle_id:
            write_journal(self.config.state_dir, None)
        self.status.set_deployment({"bundle_id": bundle_id, "phase": "failed", "reason": reason.value,
                                    "detail": detail, "at": time.time()})

    # ---------------------------------------------------------------- worker thread
    def _recompress(self, cmd: RecompressCommand) -> None:
        active = self.store.active()
        overrides = cmd.model_dump(include={"memory_bytes", "storage_bytes", "latency_ms", "fidelity_budget"},
                                   exclude_none=True)
        if active is None or not self.deployer.has_bundle(active.meta.bundle_id):
            j = Journal(deployment_id=cmd.cmd_id, bundle_id=active.meta.bundle_id if active else "none")
            self.status.report(Phase.FAILED, j, reason=FailureReason.BAD_COMMAND,
                               detail="no active model with a stored bundle to recompress from; deploy a bundle first")
            return
        self.deployer.deploy(Journal(deployment_id=cmd.cmd_id, bundle_id=active.meta.bundle_id, policy=overrides,
                                     kind="recompress"))

    def _rollback(self, cmd: RollbackCommand) -> None:
        active = self.store.active()
        j = Journal(deployment_id=cmd.deployment_id or cmd.cmd_id,
                    bundle_id=active.meta.bundle_id if active else "none")
        try:
            self.store.rollback(cmd.reason or "rollback command")
            info, data = self.store.load_active_bytes()
            self.engine.load(data, info.version, info.meta.preprocessing)
        except (StoreError, ModelError) as exc:
            self.status.report(Phase.FAILED, j, reason=FailureReason.BAD_COMMAND, detail=str(exc))
            return
        self._attach(info)
        self.status.report(Phase.ACTIVE, j.model_copy(update={"bundle_id": info.meta.bundle_id}),
                           detail=f"rolled back on request to slot {info.slot}", plan=info.meta.plan)

    # ---------------------------------------------------------------- trial failures
    def on_trial_failure(self, journal: Journal | None, version: str, error: str) -> None:
        """Engine hook (request thread): a newly activated model failed at run time; the worker rolls it back."""
        self._enqueue(lambda: self._auto_rollback(journal, version, error))

    def _auto_rollback(self, journal: Journal | None, version: str, error: str) -> None:
        """Go back to the previous slot once and report ``rolled_back`` (never re-tried: the
        model served again is not on trial, and the deployment journal is already closed)."""
        if self.engine.model_version != version:
            return  # replaced meanwhile (another deployment or a manual rollback)
        active = self.store.active()
        j = journal or Journal(bundle_id=active.meta.bundle_id if active else "none")
        why = f"run-time error within its first {self.config.trial_runs} runs: {error[:1200]}"
        try:
            self.store.rollback(why[:500])
            info, data = self.store.load_active_bytes()
            self.engine.load(data, info.version, info.meta.preprocessing)
        except (StoreError, ModelError) as exc:
            log.error("automatic rollback failed", extra={"fields": {"error": str(exc)}})
            self.status.report(Phase.FAILED, j, reason=FailureReason.RUNTIME_ERROR,
                               detail=f"model {version} had a {why}; rolling back was impossible: {exc}")
            return
        log.warning("rolled back a model that failed at run time", extra={"fields": {"version": version,
                                                                                     "slot": info.slot}})
        self._attach(info)
        self.status.report(Phase.ROLLED_BACK, j, reason=FailureReason.RUNTIME_ERROR,
                           detail=f"model {version} had a {why}; serving slot {info.slot} ({info.version}) again")
