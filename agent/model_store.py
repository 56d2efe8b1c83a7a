"""The A/B model store: two slots on disk and an atomically switched "active" pointer.

Layout under ``state_dir``::

    slots/a/model.onnx   slots/a/meta.json      one model + its SlotMeta (sha256 of the model)
    slots/b/model.onnx   slots/b/meta.json
    active.json          {"slot": "a", "previous": "b", ...}   the pointer
    store.lock           flock target serialising writers across processes

Why it survives power loss (kill -9) at any moment:

- a candidate is only ever written into the slot that is NOT serving, so the serving model
  is never touched while something else is written;
- inside a slot, ``meta.json`` is removed first and written last: a slot is valid only when
  its meta exists and the model's SHA-256 equals the one in it, so a half-written slot is
  simply invalid, never wrong;
- the pointer is replaced by write temp -> fsync -> rename -> fsync directory, so it is
  either the old or the new pointer, and both name a valid slot;
- every load re-checks the hash; a corrupt active slot falls back to the other valid slot
  and says so in ``SlotInfo.fallback_reason``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toco_core.atomic_files import atomic_write, fsync_dir
from toco_core.errors import TocoError
from toco_core.messages import PlanSummary
from toco_core.preprocessing import Preprocessing

log = logging.getLogger(__name__)

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")
_MODEL = "model.onnx"
_META = "meta.json"
_POINTER = "active.json"


class StoreError(TocoError):
    """Raised when the model store cannot install, activate, roll back or load a model."""


class CandidateMeta(BaseModel):
    """What the caller knows about a model it installs (the store adds hash, size, time)."""

    model_config = ConfigDict(extra="forbid")

    bundle_id: str = Field(min_length=1, description="id of the bundle the model came from")
    # Kept as the JSON of a PlanSummary rather than typed: a summary this version cannot read
    # (written by another version) must cost the reports, never the slot and the model it serves.
    plan_summary: dict[str, Any] = Field(default_factory=dict, description="PlanSummary as JSON")
    preprocessing: Preprocessing | None = Field(None, description="image preprocessing the bundle declares")

    @property
    def plan(self) -> PlanSummary | None:
        """The slot's plan summary, typed; None when there is none or it does not validate (logged)."""
        if not self.plan_summary:
            return None
        try:
            return PlanSummary.model_validate(self.plan_summary)
        except ValidationError as exc:
            log.warning("unreadable plan summary in a slot", extra={"fields": {"error": str(exc)[:300]}})
            return None


class SlotMeta(CandidateMeta):
    """The ``meta.json`` of a slot; ``sha256`` is the commit mark of the slot's model file."""

    schema_version: int = 1
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    created_at: datetime


class RollbackRecord(BaseModel):
    """Which model was rolled back, when and why (so the agent never retries it blindly)."""

    model_config = ConfigDict(extra="forbid")

    from_slot: Slot
    bundle_id: str | None = None
    sha256: str | None = None
    reason: str | None = None
    at: datetime


class Pointer(BaseModel):
    """The ``active.json`` pointer."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    slot: Slot
    previous: Slot | None = None
    previous_sha256: str | None = Field(None, description="the rollback target's model hash")
    generation: int = Field(0, ge=0)
    switched_at: datetime
    last_rollback: RollbackRecord | None = None


@dataclass(frozen=True)
class SlotInfo:
    """A verified slot: where its model is, its metadata, and why it serves if not pointed to."""

    slot: Slot
    model_path: Path
    meta: SlotMeta
    fallback_reason: str | None = None

    @property
    def version(self) -> str:
        """Model version string reported with every inference: ``bundle_id@sha256[:12]``."""
        return f"{self.meta.bundle_id}@{self.meta.sha256[:12]}"


def _other(slot: Slot) -> Slot:
    return "b" if slot == "a" else "a"


class ModelStore:
    """Two model slots plus an atomic active pointer under ``state_dir`` (created if missing).

    Writers (install, activate, rollback) take an exclusive flock, so the daemon and a
    ``toco-agent rollback`` from a shell cannot interleave. Raises StoreError when the
    directory cannot be created.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        try:
            for slot in SLOTS:
                (self.root / "slots" / slot).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model store in {self.root}: {exc}",
                             "check the state_dir setting and its permissions") from exc
        with self._locked():
            self._remove_stale_temps()

    # ---------------------------------------------------------------- reading

    def slot_dir(self, slot: Slot) -> Path:
        """Directory of one slot."""
        return self.root / "slots" / slot

    def pointer(self) -> Pointer | None:
        """The active pointer, or None when nothing was activated yet or the file is unreadable."""
        path = self.root / _POINTER
        try:
            return Pointer.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError) as exc:
            log.error("active pointer %s is unreadable (%s); choosing the newest valid slot", path, exc)
            return None

    def verify(self, slot: Slot) -> tuple[SlotInfo | None, str | None]:
        """Check one slot: returns (SlotInfo, None) when valid, else (None, reason)."""
        info, _data, reason = self._read_slot(slot, keep_bytes=False)
        return info, reason

    def active(self) -> SlotInfo | None:
        """The slot that serves: the pointed-to slot if valid, else the other valid one.

        Returns None when no valid model exists (nothing installed yet, or both slots bad).
        A fallback is logged and stated in ``fallback_reason``.
        """
        info, _ = self._serving(keep_bytes=False)
        return info

    def load_active_bytes(self) -> tuple[SlotInfo, bytes]:
        """Read the serving model and its metadata, hash-checked on exactly the bytes returned.

        Raises StoreError when no valid model exists.
        """
        info, data = self._serving(keep_bytes=True)
        if info is None or data is None:
            raise StoreError(f"no valid model in {self.root}", "deploy a bundle to this device first")
        return info, data

    # ---------------------------------------------------------------- writing

    def install_candidate(self, model_bytes: bytes, meta: CandidateMeta | dict[str, Any]) -> Slot:
        """Write a model into the slot that is not serving; returns that slot's name.

        The serving slot is never touched. Until ``activate`` the candidate is inert.
        Raises StoreError on a disk error (the store stays usable) or bad metadata.
        """
        try:
            cand = meta if isinstance(meta, CandidateMeta) else CandidateMeta.model_validate(meta)
        except ValidationError as exc:
            raise StoreError(f"bad candidate metadata: {exc}", "pass bundle_id and plan_summary") from exc
        with self._locked():
            serving, _ = self._serving(keep_bytes=False)
            slot = _other(serving.slot) if serving else "a"
            full = SlotMeta(**cand.model_dump(), sha256=hashlib.sha256(model_bytes).hexdigest(),
                            size=len(model_bytes), created_at=datetime.now(UTC))
            folder = self.slot_dir(slot)
            try:
                # Meta goes first and comes back last: it is the slot's commit mark.
                (folder / _META).unlink(missing_ok=True)
                fsync_dir(folder)
                atomic_write(folder / _MODEL, model_bytes)
                atomic_write(folder / _META, full.model_dump_json(indent=1).encode())
            except OSError as exc:
                raise StoreError(f"cannot write the candidate into slot {slot}: {exc}",
                                 "free disk space in the state directory") from exc
        log.info("installed candidate %s into slot %s", full.bundle_id, slot)
        return slot

    def activate(self, slot: Slot) -> SlotInfo:
        """Make ``slot`` the active one (atomic pointer switch); returns its SlotInfo.

        The slot that served before becomes ``previous`` (the rollback target).
        Raises StoreError when ``slot`` is not a valid slot.
        """
        with self._locked():
            info, reason = self.verify(self._check_name(slot))
            if info is None:
                raise StoreError(f"cannot activate slot {slot}: {reason}", "install a candidate first")
            serving, _ = self._serving(keep_bytes=False)
            old = self.pointer()
            previous: tuple[Slot | None, str | None]
            if serving is not None and serving.slot != slot:
                previous = (serving.slot, serving.meta.sha256)
            else:
                previous = (old.previous, old.previous_sha256) if old else (None, None)
            self._write_pointer(slot, previous, old)
        log.info("activated slot %s (%s)", slot, info.version)
        return info

    def rollback(self, reason: str | None = None) -> Slot:
        """Switch back to the previous slot; returns it. ``reason`` is kept in the pointer.

        Afterwards there is no previous slot: rolling back twice does not bring back the
        model that was rolled back (``activate`` still can). Raises StoreError when there
        is no previous slot or it is not valid anymore (a newer candidate was installed).
        """
        with self._locked():
            serving, _ = self._serving(keep_bytes=False)
            old = self.pointer()
            if serving is None or old is None:
                raise StoreError("nothing to roll back from: no active model", "deploy a bundle first")
            if old.previous_sha256 is None:
                raise StoreError("there is no previous model to roll back to",
                                 "a model is kept for rollback only after another one was activated over it")
            target = _other(serving.slot)
            info, why = self.verify(target)
            if info is not None and info.meta.sha256 != old.previous_sha256:
                why = f"slot {target} now holds another model ({info.version}), not the previous one"
                info = None
            if info is None:
                raise StoreError(f"cannot roll back to slot {target}: {why}",
                                 "the previous model is gone; deploy a bundle again")
            record = RollbackRecord(from_slot=serving.slot, bundle_id=serving.meta.bundle_id,
                                    sha256=serving.meta.sha256, reason=reason, at=datetime.now(UTC))
            # No way back to a rolled-back model by rollback again: only an explicit activate.
            self._write_pointer(target, (None, None), old, record)
        log.warning("rolled back from slot %s to %s: %s", serving.slot, target, reason or "no reason given")
        return target

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _check_name(slot: str) -> Slot:
        if slot not in SLOTS:
            raise StoreError(f"unknown slot {slot!r}", "slots are 'a' and 'b'")
        return slot

    def _write_pointer(self, slot: Slot, previous: tuple[Slot | None, str | None], old: Pointer | None,
                       record: RollbackRecord | None = None) -> None:
        ptr = Pointer(slot=slot, previous=previous[0], previous_sha256=previous[1],
                      generation=(old.generation + 1) if old else 1,
                      switched_at=datetime.now(UTC),
                      last_rollback=record or (old.last_rollback if old else None))
        try:
            atomic_write(self.root / _POINTER, ptr.model_dump_json(indent=1).encode())
        except OSError as exc:
            raise StoreError(f"cannot write the active pointer: {exc}",
                             "free disk space in the state directory") from exc

    def _read_slot(self, slot: Slot, keep_bytes: bool) -> tuple[SlotInfo | None, bytes | None, str | None]:
        folder = self.slot_dir(slot)
        try:
            meta = SlotMeta.model_validate_json((folder / _META).read_bytes())
        except FileNotFoundError:
            return None, None, f"slot {slot} is empty or was not completely written"
        except (OSError, ValidationError, ValueError) as exc:
            return None, None, f"slot {slot} has unreadable metadata ({exc.__class__.__name__})"
        try:
            data = (folder / _MODEL).read_bytes()
        except OSError as exc:
            return None, None, f"slot {slot} has no readable model file ({exc})"
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.sha256:
            return None, None, f"slot {slot} is corrupt: model sha256 {digest[:12]} != {meta.sha256[:12]} in meta.json"
        return SlotInfo(slot, folder / _MODEL, meta), (data if keep_bytes else None), None

    def _serving(self, keep_bytes: bool) -> tuple[SlotInfo | None, bytes | None]:
        ptr = self.pointer()
        if ptr is not None:
            info, data, reason = self._read_slot(ptr.slot, keep_bytes)
            if info is not None:
                return info, data
            candidates = [_other(ptr.slot)]
            problem = f"active slot {ptr.slot} is not usable: {reason}"
        else:
            if not (self.root / _POINTER).exists():
                return None, None  # never activated: the fresh-box state, not a fault
            candidates = list(SLOTS)
            problem = "the active pointer is unreadable"
        found = [(info, data) for info, data, _ in (self._read_slot(s, keep_bytes) for s in candidates)
                 if info is not None]
        if not found:
            log.error("%s and no other valid slot exists", problem)
            return None, None
        info, data = max(found, key=lambda r: r[0].meta.created_at)
        log.error("%s; serving slot %s instead", problem, info.slot)
        return SlotInfo(info.slot, info.model_path, info.meta, fallback_reason=problem), data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _remove_stale_temps(self) -> None:
        for tmp in [*self.root.glob(".*.tmp"), *self.root.glob("slots/*/.*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()
