"""Resumable, verified bundle downloads over MQTT (docs/protocol.md, "chunk flow").

The flow: subscribe, admit the manifest (agent.bundle_admission), request chunks in a window,
store what verifies, re-request what is overdue, check the whole. What each download keeps on
disk, so that a restart or reconnect requests only what is missing, is agent.download_job.

Handlers run on the link's dispatcher thread; ``on_complete(manifest, data)`` and
``on_failed(bundle_id, reason, detail)`` run there too: hand long work (recompression) to
another thread. A parts bundle (format 2) is only admitted here: its manifest goes to
``on_parts(manifest, deployment_id)`` and its parts are fetched by agent.parts_fetch.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle_admission import refusal
from agent.download_job import DownloadJob, saved_jobs
from agent.mqtt_link import MqttLink
from agent.parts_store import is_parts_bundle
from toco_core.errors import TransferError
from toco_core.messages import (
    SHA256_PATTERN,
    BundleManifest,
    Chunk,
    ChunkRequest,
    FailureReason,
    MessageError,
    MessageKind,
    Phase,
    StatusMessage,
)
from toco_core.rerequest import Backoff, QuietTimer
from toco_core.transfer import ChunkCheck, accept_chunk, missing_chunks, verify_assembled

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger("toco.agent.download")
_REFUSALS = {FailureReason.UNSIGNED, FailureReason.BAD_SIGNATURE, FailureReason.BAD_MANIFEST, FailureReason.NO_DISK,
             FailureReason.NO_MEMORY, FailureReason.DOWNGRADE}


class BundleDownloader:
    """Downloads bundles named by id through an MqttLink, verifying signature, chunks and whole."""

    def __init__(self, link: MqttLink, state_dir: str | Path, public_key: Ed25519PublicKey | Path,
                 on_complete: Callable[[BundleManifest, bytes], None],
                 on_failed: Callable[[str, FailureReason, str], None] | None = None, *, window: int = 32,
                 max_retries: int = 3, request_timeout: float = 10.0, backoff_cap: float = 60.0, max_stalls: int = 6,
                 sync_every: int = 8,
                 disk_budget: int | None = None, mem_budget: int | None = None,
                 on_parts: Callable[[BundleManifest, str | None], None] | None = None,
                 admit: Callable[[BundleManifest], str | None] | None = None) -> None:
        """Up to ``window`` chunks are in flight (32 instead of 16: 70-80% instead of 55% of the raw
        broker throughput on loopback, bench/agent.py; at most 8 MiB buffered at 256 KiB chunks).
        A chunk failing its hash ``max_retries`` times, or ``max_stalls`` re-requests in a row without a chunk
        arriving in between while connected, fail the download. The chunks in flight are asked for again only
        after ``request_timeout`` s without any chunk, then backing off (doubling, jitter) up to ``backoff_cap`` s
        (toco_core.rerequest): a busy server still answering is not asked twice. Chunks are
        fsynced and recorded ``sync_every`` at a time (a crash re-fetches at most that many).
        ``public_key`` as a PEM file path is checked in a child process (agent.child_tasks), so
        cryptography never loads into the daemon; a key object is used in this process. ``admit(manifest)``,
        called once the signature verified, returns why the bundle is refused as a downgrade (or None)."""
        self.link = link
        self.root = Path(state_dir) / "downloads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self.on_complete = on_complete
        self.on_failed = on_failed or (lambda b, r, d: None)
        self.on_parts = on_parts
        self.admit = admit
        self.window, self.max_retries, self.sync_every = window, max_retries, sync_every
        self.request_timeout, self.max_stalls = request_timeout, max_stalls
        self.backoff = Backoff(first=request_timeout, cap=max(request_timeout, backoff_cap))
        self.disk_budget, self.mem_budget = disk_budget, mem_budget
        self.stats: Counter[str] = Counter()
        self._jobs: dict[str, DownloadJob] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        link.on_connected(self._on_reconnect)
        self._watchdog = threading.Thread(target=self._watch, name="bundle-watchdog", daemon=True)
        self._watchdog.start()

    # ---- public --------------------------------------------------------------------------
    def download(self, bundle_id: str, deployment_id: str | None = None) -> None:
        """Start (or resume) downloading ``bundle_id``; returns at once. Raises MessageError for a bad id."""
        if not re.fullmatch(SHA256_PATTERN, bundle_id):
            raise MessageError(f"bundle id {bundle_id!r} is not a sha256 hex digest", "use the manifest's bundle_id")
        with self._lock:
            if bundle_id in self._jobs:
                return
            job = DownloadJob.create(self.root, bundle_id, deployment_id)
            job.timer = QuietTimer(self.backoff)
            job.timer.progress(time.monotonic())
            self._jobs[bundle_id] = job
            self.link.on(self.link.topics.manifest(bundle_id), MessageKind.MANIFEST, self._on_manifest)
            # QoS 0 on purpose: the broker then never queues chunks for an offline session (up to
            # 256 KiB each, for every device downloading), and a lost chunk is re-requested anyway.
            self.link.on(self.link.topics.chunk(bundle_id), MessageKind.CHUNK, self._on_chunk, qos=0)
            self._status(job, Phase.RECEIVED)
            manifest = job.saved_manifest()
            if manifest is not None:  # resume at once from the verified copy, without waiting for the broker
                self._on_manifest(self.link.topics.manifest(bundle_id), manifest)

    def resume_pending(self) -> list[str]:
        """Resume every download left in the state dir by an earlier run; returns their bundle ids."""
        ids = []
        for bundle_id, deployment_id in saved_jobs(self.root):
            self.download(bundle_id, deployment_id)
            ids.append(bundle_id)
        return ids

    def progress(self, bundle_id: str) -> tuple[int, int] | None:
        """(chunks present, chunks total) of an active download, or None."""
        with self._lock:
            job = self._jobs.get(bundle_id)
            return (job.bitmap.count, job.bitmap.n) if job and job.bitmap else None

    def close(self) -> None:
        """Stop the watchdog and close files; partial downloads stay for a later resume."""
        self._closed.set()
        with self._lock:
            for job in self._jobs.values():
                job.close_file()
        self._watchdog.join(2.0)

    # ---- handlers (dispatcher thread) -----------------------------------------------------
    def _on_manifest(self, topic: str, manifest: BundleManifest) -> None:
        with self._lock:
            job = self._jobs.get(manifest.bundle_id)
            if job is None or job.manifest is not None:
                return
            if not topic.endswith(f"/{manifest.bundle_id}/manifest"):
                return self._fail(job, FailureReason.BAD_MANIFEST, f"manifest for {manifest.bundle_id[:12]} on {topic}")
            refused = refusal(manifest, self.public_key, self.root, self.disk_budget, self.mem_budget)
            if refused is not None:
                return self._fail(job, *refused)
            downgrade = self.admit(manifest) if self.admit is not None else None
            if downgrade is not None:
                return self._fail(job, FailureReason.DOWNGRADE, downgrade)
            if is_parts_bundle(manifest):
                return self._hand_over_parts(job, manifest)
            try:
                job.open(manifest)
            except OSError as exc:
                return self._fail(job, _disk_reason(exc), f"cannot create the download file: {exc}")
            bitmap = job.bitmap
            assert bitmap is not None  # open() made it
            self.stats["chunks_resumed"] += bitmap.count
            self._status(job, Phase.DOWNLOADING, progress=bitmap.count / bitmap.n)
            self._pump(job)

    def _on_chunk(self, topic: str, chunk: Chunk) -> None:
        with self._lock:
            job = self._jobs.get(chunk.bundle_id)
            if job is None or job.bitmap is None or not topic.endswith(f"/{chunk.bundle_id}/chunk/{chunk.index}"):
                self.stats["chunk_ignored"] += 1
                return
            i = chunk.index
            if i < job.bitmap.n and job.bitmap.has(i):
                self.stats["chunk_duplicate"] += 1  # chunks go to every downloader: not an answer to this one
                return
            check = accept_chunk(job.manifest, i, chunk.data)  # type: ignore[arg-type]
            if check is not ChunkCheck.OK:
                return self._reject(job, i, check)
            try:
                job.write_chunk(i, chunk.data)
                if job.unsynced >= self.sync_every:
                    job.persist()
            except OSError as exc:
                return self._fail(job, _disk_reason(exc), f"writing chunk {i} failed: {exc}")
            job.inflight.pop(i, None)
            job.timer.progress(time.monotonic())
            self.stats["chunks_stored"] += 1
            decile = job.bitmap.count * 10 // job.bitmap.n
            if decile > job.reported and not job.bitmap.complete:
                job.reported = decile
                self._status(job, Phase.DOWNLOADING, progress=job.bitmap.count / job.bitmap.n)
            self._pump(job)

    def _on_reconnect(self) -> None:
        with self._lock:
            for job in list(self._jobs.values()):
                if job.connection == self.link.connection:
                    continue  # it started on this connection after the link came up: its requests are out
                job.inflight.clear()
                job.timer.progress(time.monotonic())  # a new connection: the silence before it does not count
                if job.bitmap is not None:
                    self._pump(job)

    # ---- steps ----------------------------------------------------------------------------
    def _hand_over_parts(self, job: DownloadJob, manifest: BundleManifest) -> None:
        """A signed parts manifest with room for it: no container download; the parts fetcher takes over."""
        if self.on_parts is None:
            return self._fail(job, FailureReason.BAD_MANIFEST, "this downloader does not fetch parts bundles")
        self._forget(job)
        job.remove()
        self._status(job, Phase.DOWNLOADING, progress=0.0, detail="parts bundle: fetching the parts a plan needs")
        try:
            self.on_parts(manifest, job.deployment_id)
        except Exception:
            log.exception("parts manifest callback failed", extra={"fields": {"bundle": job.bundle_id[:12]}})
            self._status(job, Phase.FAILED, reason=FailureReason.INTERNAL, detail="storing the parts manifest failed")

    def _reject(self, job: DownloadJob, i: int, check: ChunkCheck) -> None:
        self.stats["chunk_corrupt"] += 1
        job.retries[i] += 1
        log.warning("chunk rejected", extra={"fields": {"bundle": job.bundle_id[:12], "chunk": i, "why": check.value}})
        if check is ChunkCheck.OUT_OF_RANGE:
            return
        if job.retries[i] > self.max_retries:
            return self._fail(job, FailureReason.CORRUPT_CHUNK,
                              f"chunk {i} failed verification ({check.value}) {job.retries[i]} times")
        job.inflight.pop(i, None)
        self._pump(job)

    def _pump(self, job: DownloadJob) -> None:
        """Request missing chunks until ``window`` are in flight; finish when all are here."""
        if job.bitmap.complete:  # type: ignore[union-attr]
            return self._finish(job)
        room = self.window - len(job.inflight)
        if room < max(1, self.window // 2) or not self.link.connected:  # refill in batches: fewer requests
            return
        want = missing_chunks(job.bitmap, room, skip=set(job.inflight))  # type: ignore[arg-type]
        if not want:
            return
        now = time.monotonic()
        job.connection = self.link.connection
        for i in want:
            job.inflight[i] = now
        self.stats["chunks_requested"] += len(want)
        self.link.send(ChunkRequest(device_id=self.link.device_id, bundle_id=job.bundle_id, chunks=want))

    def _finish(self, job: DownloadJob) -> None:
        manifest = job.manifest
        job.close_file()
        try:
            data = job.read_data()
            verify_assembled(manifest, data)  # type: ignore[arg-type]
        except OSError as exc:
            return self._fail(job, _disk_reason(exc), f"reading the download back failed: {exc}")
        except TransferError as exc:
            return self._fail(job, FailureReason.BUNDLE_HASH_MISMATCH, str(exc))
        self._status(job, Phase.VERIFIED, progress=1.0)
        self._forget(job)
        try:
            self.on_complete(manifest, data)  # type: ignore[arg-type]
        except Exception:
            log.exception("bundle completion callback failed", extra={"fields": {"bundle": job.bundle_id[:12]}})
            self._status(job, Phase.FAILED, reason=FailureReason.INTERNAL, detail="storing the bundle failed")
            return
        job.remove()  # only now: a crash before this finishes from disk

    def _fail(self, job: DownloadJob, reason: FailureReason, detail: str) -> None:
        log.warning("bundle download failed", extra={"fields": {"bundle": job.bundle_id[:12], "reason": reason.value,
                                                                "detail": detail}})
        self.stats[f"failed_{reason.value}"] += 1
        job.close_file()
        self._forget(job)
        job.remove()
        phase = Phase.REFUSED if reason in _REFUSALS else Phase.FAILED
        self._status(job, phase, reason=reason, detail=detail)
        self.on_failed(job.bundle_id, reason, detail)

    # ---- helpers --------------------------------------------------------------------------
    def _forget(self, job: DownloadJob) -> None:
        self._jobs.pop(job.bundle_id, None)
        self.link.off(self.link.topics.manifest(job.bundle_id))
        self.link.off(self.link.topics.chunk(job.bundle_id))

    def _status(self, job: DownloadJob, phase: Phase, **fields: Any) -> None:
        self.link.send(StatusMessage(device_id=self.link.device_id, phase=phase, deployment_id=job.deployment_id,
                                     bundle_id=job.bundle_id, **fields))

    def _watch(self) -> None:
        """Ask again for the chunks in flight once none arrived for the backoff's delay; fail after ``max_stalls``
        re-requests in a row without a chunk."""
        while not self._closed.wait(min(1.0, self.request_timeout / 4)):
            if not self.link.connected:
                continue
            now = time.monotonic()
            with self._lock:
                for job in list(self._jobs.values()):
                    if job.bitmap is None:
                        continue
                    if job.inflight and job.timer.due(now):
                        self.stats["timeouts"] += 1
                        if job.timer.attempts >= self.max_stalls:
                            self._fail(job, FailureReason.TRANSFER_STALLED,
                                       f"no chunk arrived for {job.timer.silent_for(now):.0f} s although the "
                                       f"missing chunks were asked for again {job.timer.attempts} times (after "
                                       f"{self.backoff.first:.0f} s of silence, backing off to "
                                       f"{self.backoff.cap:.0f} s)")
                            continue
                        self.stats["chunks_rerequested"] += len(job.inflight)
                        job.inflight.clear()
                        job.timer.asked_again(now)
                    self._pump(job)


def _disk_reason(exc: OSError) -> FailureReason:
    return FailureReason.NO_DISK if exc.errno in (errno.ENOSPC, errno.EDQUOT) else FailureReason.INTERNAL
