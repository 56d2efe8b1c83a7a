"""Fetching the parts of a parts bundle over MQTT: (part, range) requests, answers to this box alone.

``PartsFetcher.fetch(manifest, names)`` blocks the calling thread (the agent's worker) until
every named part is here and verified against the signed manifest, and fails with a typed
FetchFailed otherwise. It asks on ``bundles/{b}/get/{device}`` for ranges of at most
``range_size`` bytes, ``window`` ranges in flight (refilled in batches of half a window), and
the server answers on ``bundles/{b}/part/{device}``, which only this device may read (ACL).
Ranges are written into ``{part}.partial`` and recorded in ``{part}.ranges.json`` every
``sync_every`` ranges (agent.parts_store), so a restart or reconnect asks only for what is
missing; parts already verified are never asked for again (a roomier plan later fetches only
the parts it adds).

A part is checked when its last range arrives: a SHA-256 or size other than the manifest's
deletes it and asks again at once, at most ``max_retries`` times (then ``corrupt_chunk``), marking
those requests ``refetch`` so the server does not take them for duplicates of what it just sent. The ranges in
flight are asked for again only once no frame at all has arrived for ``request_timeout`` (a busy
server that is still streaming answers is not asked twice), and each further re-request without a
frame in between waits twice as long, up to ``backoff_cap``, with jitter (toco_core.rerequest).
``max_stalls`` re-requests in a row without a frame, while connected, fail the fetch
(``transfer_stalled``). While disconnected nothing times out; a reconnect asks again at once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.mqtt_link import MqttLink
from agent.parts_store import PartialPart, PartsStore, part_entry
from toco_core.errors import TocoError, TransferError
from toco_core.messages import (
    MAX_RANGE_LENGTH,
    MAX_RANGES_PER_REQUEST,
    BundleManifest,
    FailureReason,
    MessageKind,
    Part,
    PartRange,
    PartRequest,
)
from toco_core.rerequest import Backoff, QuietTimer

log = logging.getLogger("toco.agent.parts")
Progress = Callable[[int, int], None]  # (bytes here, bytes wanted)


class FetchFailed(TocoError):
    """A fetch that cannot finish; ``reason`` is the wire code for the status message."""

    def __init__(self, reason: FailureReason, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.reason = reason


class FetchClosed(TocoError):
    """The fetcher was closed (the agent is stopping) before the parts were here; resumed at the next start."""


@dataclass
class _Fetch:
    """One fetch in progress: the parts still arriving and the ranges asked for."""

    manifest: BundleManifest
    partials: dict[str, PartialPart]
    timer: QuietTimer  # when to ask again for the ranges in flight (no frame for a while, then backing off)
    inflight: dict[tuple[str, int], float] = field(default_factory=dict)  # (part, range) -> monotonic request time
    retries: Counter[str] = field(default_factory=Counter)
    refetch: set[str] = field(default_factory=set)  # parts refused by their hash, asked for again as refetches
    received: int = 0  # bytes received and not yet added to the store's count
    total: int = 0  # bytes received by this fetch
    connection: int = 0  # the link connection its last request went out on (MqttLink.connection)
    error: FetchFailed | FetchClosed | None = None
    done: threading.Event = field(default_factory=threading.Event)


class PartsFetcher:
    """Fetches parts of parts bundles into a PartsStore through an MqttLink (one fetch per bundle at a time)."""

    def __init__(self, link: MqttLink, store: PartsStore, *, range_size: int = MAX_RANGE_LENGTH, window: int = 32,
                 max_retries: int = 3, request_timeout: float = 10.0, backoff_cap: float = 60.0,
                 max_stalls: int = 6, sync_every: int = 8) -> None:
        """``range_size`` <= 256 KiB per answer; ``window`` ranges in flight (8 MiB at most at 256 KiB);
        ``request_timeout`` s without a frame before the first re-request, doubling up to ``backoff_cap`` s.
        Raises TransferError for a range size or delays out of bounds."""
        if not 0 < range_size <= MAX_RANGE_LENGTH:
            raise TransferError(f"range size {range_size} is outside 1..{MAX_RANGE_LENGTH}", "use at most 256 KiB")
        self.link, self.store = link, store
        self.range_size, self.window, self.max_retries = range_size, window, max_retries
        self.backoff = Backoff(first=request_timeout, cap=max(request_timeout, backoff_cap))
        self.request_timeout, self.max_stalls, self.sync_every = request_timeout, max_stalls, sync_every
        self.stats: Counter[str] = Counter()
        self._fetches: dict[str, _Fetch] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        link.on_connected(self._on_reconnect)

    # ---- public (worker thread) ------------------------------------------------------------
    def missing(self, manifest: BundleManifest, names: list[str]) -> list[str]:
        """The names among ``names`` not yet verified here, in order."""
        have = self.store.have(manifest.bundle_id)
        return [n for n in names if n not in have]

    def fetch(self, manifest: BundleManifest, names: list[str], progress: Progress = lambda *a: None) -> int:
        """Fetch the named parts that are not here yet; returns the bytes received for them.

        Blocks until done. Raises FetchFailed (corrupt_chunk, transfer_stalled, no_disk, bad_manifest
        for a name the manifest lacks), FetchClosed when the fetcher is closed meanwhile.
        """
        bid = manifest.bundle_id
        try:
            todo = self.missing(manifest, names)
            entries = [part_entry(manifest, n) for n in todo]
        except TransferError as exc:
            raise FetchFailed(FailureReason.BAD_MANIFEST, str(exc)) from None
        if not todo:
            return 0
        wanted = sum(e.size for e in entries)
        with self._lock:
            if self._closed.is_set():
                raise FetchClosed("the agent is stopping", "the fetch resumes at the next start")
            try:
                self.store.save_manifest(manifest)
                job = _Fetch(manifest, {n: self.store.partial(manifest, n, self.range_size) for n in todo},
                             QuietTimer(self.backoff))
                job.timer.progress(time.monotonic())
            except OSError as exc:
                raise FetchFailed(_disk_reason(exc), f"cannot create the part files: {exc}") from None
            self.stats["ranges_resumed"] += sum(p.bitmap.count for p in job.partials.values())
            self._fetches[bid] = job
            self.link.on(self.link.topics.part(bid, self.link.device_id), MessageKind.PART, self._on_part, qos=0)
            self._finish_complete(job)
            self._pump(job)
        try:
            while not job.done.wait(min(1.0, self.request_timeout / 4)):
                if self._closed.is_set():
                    raise FetchClosed("the agent is stopping", "the fetch resumes at the next start")
                with self._lock:
                    self._watch(job)
                    left = sum(p.range_len(i) for p in job.partials.values() for i in range(p.bitmap.n)
                               if not p.bitmap.has(i))
                progress(wanted - left, wanted)
            if job.error is not None:
                raise job.error
            return job.total
        finally:
            with self._lock:
                self._fetches.pop(bid, None)
                self.link.off(self.link.topics.part(bid, self.link.device_id))
                for p in job.partials.values():
                    p.close()
                self._count(job)

    def close(self) -> None:
        """Stop every fetch (each raises FetchClosed in its thread); partial parts stay for a later resume."""
        self._closed.set()
        with self._lock:
            for job in self._fetches.values():
                if not job.done.is_set():  # else the fetch would return as if its parts were all here
                    job.error = FetchClosed("the agent is stopping", "the fetch resumes at the next start")
                job.done.set()

    # ---- handlers (dispatcher thread) ------------------------------------------------------
    def _on_part(self, topic: str, msg: Part) -> None:
        with self._lock:
            job = self._fetches.get(msg.bundle_id)
            if job is None or job.done.is_set() or topic != self.link.topics.part(msg.bundle_id, self.link.device_id):
                self.stats["part_ignored"] += 1
                return
            partial = job.partials.get(msg.part)
            i, rem = divmod(msg.offset, self.range_size)
            if partial is None or rem or i >= partial.bitmap.n or len(msg.data) != partial.range_len(i):
                self.stats["part_ignored"] += 1  # not asked for, or not the range asked for: never written
                return
            job.timer.progress(time.monotonic())  # any answer, a duplicate too: the server is serving us
            job.inflight.pop((msg.part, i), None)
            if partial.bitmap.has(i):
                self.stats["part_duplicate"] += 1
                return
            try:
                partial.write(i, msg.data)
                job.received += len(msg.data)
                job.total += len(msg.data)
                if partial.unsynced >= self.sync_every:
                    partial.persist()
                    self._count(job)
                self._finish_complete(job)
            except OSError as exc:
                return self._fail(job, _disk_reason(exc), f"writing part {msg.part} failed: {exc}")
            self.stats["ranges_stored"] += 1
            self._pump(job)

    def _on_reconnect(self) -> None:
        with self._lock:
            for job in self._fetches.values():
                if job.connection == self.link.connection:
                    continue  # it started on this connection after the link came up: its requests are out
                job.inflight.clear()
                job.timer.progress(time.monotonic())  # a new connection: the silence before it does not count
                self._pump(job)

    # ---- steps (lock held) -----------------------------------------------------------------
    def _finish_complete(self, job: _Fetch) -> None:
        """Verify every part whose ranges are all here; a bad one is deleted and asked for again (bounded)."""
        for name, partial in list(job.partials.items()):
            if not partial.bitmap.complete:
                continue
            entry = part_entry(job.manifest, name)
            if partial.finish(entry):
                del job.partials[name]
                job.refetch.discard(name)
                self.stats["parts_verified"] += 1
                continue
            job.retries[name] += 1
            self.stats["part_corrupt"] += 1
            log.warning("part refused: it does not match its signed hash",
                        extra={"fields": {"bundle": job.manifest.bundle_id[:12], "part": name,
                                          "tries": job.retries[name]}})
            if job.retries[name] > self.max_retries:
                del job.partials[name]
                return self._fail(job, FailureReason.CORRUPT_CHUNK,
                                  f"part {name} failed its signed SHA-256 {job.retries[name]} times")
            job.partials[name] = self.store.partial(job.manifest, name, self.range_size)
            # the server coalesces a range it sent moments ago (fleet_server.recent_ranges): say these are wanted again
            job.refetch.add(name)
        if not job.partials:
            job.done.set()

    def _pump(self, job: _Fetch) -> None:
        """Ask for missing ranges until ``window`` are in flight (in batches of at least half a window)."""
        if job.done.is_set() or not self.link.connected:
            return
        room = self.window - len(job.inflight)
        if room < max(1, self.window // 2):
            return
        want: list[PartRange] = []
        for name, partial in job.partials.items():
            for i in range(partial.bitmap.n):
                if len(want) >= min(room, MAX_RANGES_PER_REQUEST):
                    break
                if not partial.bitmap.has(i) and (name, i) not in job.inflight:
                    want.append(PartRange(part=name, offset=i * self.range_size, length=partial.range_len(i)))
        if not want:
            return
        now = time.monotonic()
        job.connection = self.link.connection
        for r in want:
            job.inflight[(r.part, r.offset // self.range_size)] = now
        self.stats["ranges_requested"] += len(want)
        for refetch in (True, False):
            if ranges := [r for r in want if (r.part in job.refetch) == refetch]:
                self.link.send(PartRequest(device_id=self.link.device_id, bundle_id=job.manifest.bundle_id,
                                           ranges=ranges, refetch=refetch))

    def _watch(self, job: _Fetch) -> None:
        """Ask again for the ranges in flight once no frame came for the backoff's delay; fail after ``max_stalls``
        re-requests in a row without a frame while connected."""
        if not self.link.connected or job.done.is_set():
            return
        now = time.monotonic()
        if job.inflight and job.timer.due(now):
            self.stats["timeouts"] += 1
            if job.timer.attempts >= self.max_stalls:
                return self._fail(job, FailureReason.TRANSFER_STALLED,
                                  f"no part frame arrived for {job.timer.silent_for(now):.0f} s although the "
                                  f"missing ranges were asked for again {job.timer.attempts} times (after "
                                  f"{self.backoff.first:.0f} s of silence, backing off to {self.backoff.cap:.0f} s)")
            self.stats["ranges_rerequested"] += len(job.inflight)
            job.inflight.clear()
            job.timer.asked_again(now)
        self._pump(job)

    def _fail(self, job: _Fetch, reason: FailureReason, detail: str) -> None:
        log.warning("part fetch failed", extra={"fields": {"bundle": job.manifest.bundle_id[:12],
                                                           "reason": reason.value, "detail": detail}})
        self.stats[f"failed_{reason.value}"] += 1
        job.error = FetchFailed(reason, detail)
        job.done.set()

    def _count(self, job: _Fetch) -> None:
        try:
            self.store.add_received(job.manifest.bundle_id, job.received)
            job.received = 0
        except OSError:
            pass


def _disk_reason(exc: OSError) -> FailureReason:
    return FailureReason.NO_DISK if exc.errno in (errno.ENOSPC, errno.EDQUOT) else FailureReason.INTERNAL
