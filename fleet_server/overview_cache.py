"""The overview's device combinations, reused between dashboard polls while no device's counted values change.

Every overview page with facets runs one GROUP BY over the whole devices table
(fleet_server.device_facets.combinations): 18-26 ms on PostgreSQL at 10,000 devices, more under
ingest, which rewrites device rows with every telemetry point. Telemetry changes none of the values
counted (state, alert, drift kind, group, bundle), so most polls would recount the same numbers.

A result is reused while all hold:
- no session of this process has committed a change to those values since it was counted (a flush
  listener on every SQLAlchemy Session marks a commit that adds, deletes or changes a device's
  counted column; the commit moves ``generation``);
- no event relayed from another replica that may follow such a change arrived since
  (fleet_server.event_relay calls ``outdate_counts``): the dashboard reloads the page on those
  events, and must not be shown the counts from before them;
- it is younger than ``max_age_s``, for what reaches this process only through the database (a
  relayed event is best effort; 0 turns the reuse off).

So the counts are reused while the fleet's counted values stand still, as between polls of a quiet
fleet or under telemetry alone; with two replicas at 10,000 devices relayed drift events outdate
them many times a second and nearly every poll counts again.

Only the listing without an id search is reused (the search is applied by the database).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from fleet_server.db import Database, DeviceRow
from fleet_server.device_facets import Combination

# the DeviceRow columns combinations() reads, directly or through device_facets.state_expression
COUNTED = ("enrollment", "online", "deploy_state", "alert", "drift_kind", "group", "active_bundle")
_CHANGED = "toco_counted_device_change"
_lock = threading.Lock()
_generation = 0


def generation() -> int:
    """How often this process' counts were outdated (outdate_counts), monotonic."""
    return _generation


def _changes_counts(session: Session) -> bool:
    if any(isinstance(o, DeviceRow) for o in itertools.chain(session.new, session.deleted)):
        return True
    for obj in session.dirty:
        if isinstance(obj, DeviceRow):
            attrs = inspect(obj).attrs
            if any(attrs[name].history.has_changes() for name in COUNTED):
                return True
    return False


def outdate_counts() -> None:
    """Count again at the next call: a counted value may have changed."""
    global _generation
    with _lock:
        _generation += 1


@event.listens_for(Session, "after_flush")
def _note_device_change(session: Session, _context: Any) -> None:
    # after_flush still shows the flushed objects as new / dirty / deleted, with their history
    if not session.info.get(_CHANGED) and _changes_counts(session):
        session.info[_CHANGED] = True


@event.listens_for(Session, "after_commit")
def _bump_generation(session: Session) -> None:
    if session.info.pop(_CHANGED, False):
        outdate_counts()


@event.listens_for(Session, "after_rollback")
def _forget_device_change(session: Session) -> None:
    session.info.pop(_CHANGED, None)


@dataclass(frozen=True)
class _Counted:
    generation: int
    at: float
    combos: list[Combination]


_counted: weakref.WeakKeyDictionary[Database, _Counted] = weakref.WeakKeyDictionary()


def cached_combinations(db: Database, max_age_s: float, count: Callable[[], list[Combination]]) -> list[Combination]:
    """The combinations of ``db``'s devices: the last ones counted when still valid (module doc), else
    ``count()``'s, kept for the next call. Takes the Database, the age limit in seconds and the function
    that counts them (in the caller's session). Returns the combinations; raises what ``count`` raises."""
    now, gen = time.monotonic(), generation()  # read before counting: a commit during the count outdates it
    kept = _counted.get(db)
    if kept is not None and kept.generation == gen and now - kept.at < max_age_s:
        return kept.combos
    combos = count()
    if max_age_s > 0:
        _counted[db] = _Counted(gen, now, combos)
    return combos
