"""Device enrollment: which devices the server trusts, in which group, with which models.

A device is one of three standings (``DeviceRow.enrollment``):

- ``enrolled``: made by ``toco-fleet devices enroll``; deployed to, its drift can trigger a
  re-analysis, its group is the one given at enrollment (a different group in its state
  message is logged and ignored: a box must not move itself into another group's deployments);
- ``quarantined``: a device id the server has never enrolled (the broker let it in: an embedded
  broker without passwords, or credentials made by hand). It is shown, so an operator can
  enroll it, but never targeted, and its drift alerts, status and samples trigger nothing;
- ``revoked``: ``toco-fleet devices revoke``; everything it sends is ignored.

The broker credentials that go with an enrollment are fleet_server.broker_passwords'.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select

from fleet_server.db import Database, DeviceRow
from fleet_server.registry import NotFoundError, log_event
from fleet_server.views import device_view
from toco_core.errors import ConfigError
from toco_core.topics import check_id

log = logging.getLogger("toco.fleet.enrollment")
ENROLLED, QUARANTINED, REVOKED = "enrolled", "quarantined", "revoked"
STANDINGS = (ENROLLED, QUARANTINED, REVOKED)
# the server's own MQTT identities: its user (deploy/mosquitto/make-acl.sh) and client ids toco-fleet-{fleet}.
# A device by such a name could take the server's session over; refuse the names outright.
RESERVED_PREFIXES = ("toco-fleet", "toco-server")


class EnrollmentError(ConfigError):
    """Raised when a device cannot be enrolled or revoked as asked (a reserved or malformed name, say)."""


def check_device_name(name: str) -> str:
    """Return ``name`` if it can be a device: a topic-safe id that is none of the server's own identities.

    Raises EnrollmentError otherwise.
    """
    try:
        check_id(name, "device id")
    except ConfigError as exc:
        raise EnrollmentError(exc.message, exc.hint) from None
    if name.lower().startswith(RESERVED_PREFIXES):
        raise EnrollmentError(f"device id {name!r} is reserved for the fleet server's own MQTT user and client ids",
                              f"pick a name that starts with none of {', '.join(RESERVED_PREFIXES)}")
    return name


def enroll(db: Database, name: str, group: str, allowed_models: list[str] | None = None) -> dict[str, Any]:
    """Enroll device ``name`` in ``group`` (again: its group and allowed models are replaced).

    Takes the fleet database, the device id, its group and the model ids it may run (None: any).
    Returns the device's API view. Raises EnrollmentError for a reserved or malformed name or group.
    A quarantined or revoked device becomes enrolled; what it reported so far is kept.
    """
    check_device_name(name)
    try:
        check_id(group, "group")
    except ConfigError as exc:
        raise EnrollmentError(exc.message, exc.hint) from None
    now = time.time()
    with db.session(write=True) as s:
        d = s.get(DeviceRow, name)
        if d is None:
            d = DeviceRow(id=name, online=False, birth=0, last_seen=now, hardware={}, alert=False, bad_messages=0)
            s.add(d)
        before = d.enrollment
        d.group, d.enrollment, d.enrolled_at = group, ENROLLED, now
        d.allowed_models = sorted(set(allowed_models)) if allowed_models else None
        log_event(s, "enrollment", {"device_id": name, "enrollment": ENROLLED, "group": group, "before": before,
                                    "allowed_models": d.allowed_models})
        return device_view(d)


def revoke(db: Database, name: str) -> dict[str, Any]:
    """Mark device ``name`` revoked: from now on the server ignores everything it sends.

    A name never seen is recorded as revoked too, so it is ignored should it ever connect.
    Returns the device's API view. Raises EnrollmentError for a malformed name.
    """
    try:
        check_id(name, "device id")
    except ConfigError as exc:
        raise EnrollmentError(exc.message, exc.hint) from None
    with db.session(write=True) as s:
        d = s.get(DeviceRow, name)
        if d is None:
            d = DeviceRow(id=name, online=False, birth=0, last_seen=time.time(), hardware={}, alert=False,
                          bad_messages=0)
            s.add(d)
        before = d.enrollment
        d.enrollment, d.online, d.deploy_state = REVOKED, False, None
        log_event(s, "enrollment", {"device_id": name, "enrollment": REVOKED, "before": before})
        return device_view(d)


def listing(db: Database) -> list[dict[str, Any]]:
    """Every device the server knows, enrolled, quarantined or revoked, by id (the API's views)."""
    with db.session() as s:
        return [device_view(d) for d in s.scalars(select(DeviceRow).order_by(DeviceRow.id))]


def get(db: Database, name: str) -> dict[str, Any]:
    """One device's view. Raises NotFoundError when the server has never heard of it."""
    with db.session() as s:
        d = s.get(DeviceRow, name)
        if d is None:
            raise NotFoundError(f"device {name!r} does not exist", "enroll it with `toco-fleet devices enroll`")
        return device_view(d)


def note_claimed_group(d: DeviceRow, claimed: str | None) -> bool:
    """Compare the group a device's state message names with the server's; the server's always stays.

    Takes the device row and the claimed group (None: the agent names none). Returns True on a
    mismatch, which is logged with both groups (a misconfigured box, or one trying to move itself).
    """
    if claimed is None or claimed == d.group:
        return False
    log.warning("device claims another group; its enrolled group stays",
                extra={"fields": {"device": d.id, "group": d.group, "claimed": claimed, "enrollment": d.enrollment}})
    return True


def may_run(d: DeviceRow, model_id: str) -> bool:
    """Whether an enrolled device may be sent a bundle of ``model_id`` (its allowed models; None: any)."""
    return d.enrollment == ENROLLED and (d.allowed_models is None or model_id in d.allowed_models)
