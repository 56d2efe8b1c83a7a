"""Drift-policy commands the MQTT client refused: kept in the database and sent by the leader's tick.

The drift policy sends its commands (upload-samples, rebase-drift) after the transaction that decided
them has committed, from whichever replica ingested the report, from the API (an operator's accept)
or from the leader's tick. A command the MQTT client refuses (PublishRefused: every QoS 1 packet id is
taken by a publish the broker has not acknowledged, as when it is away or slow) cannot be derived again
from the state it left behind (the alert is decided, the re-analysis waits for samples, the device's
``rebased`` mark is set), so it is kept here: one row per command, unsigned (it is signed afresh when
sent, with a new sequence and expiry), in the shared database, so whichever replica leads next sends
it. ``tick`` (the leader's housekeeping) sends the kept commands oldest first and deletes each one
sent; the first refusal ends the pass, the rest waits for the next tick. A command is thus published
once: it is deleted in the transaction that holds its row locked while it is sent (a commit failing
after the publish, which nothing here provokes, would send it again).

The trusted-key push (fleet_server.key_distribution) needs none of this: its tick derives who lacks the
current key set and marks a device only once its command went out. Deployments keep their own record
(a member stays pending until its command is published, fleet_server.deployment_waves).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select

from fleet_server.command_signer import SendFn
from fleet_server.db import Database, DeviceRow, UnsentCommandRow
from fleet_server.enrollment import REVOKED
from fleet_server.mqtt_client import PublishRefused
from toco_core.messages import MessageError, MessageKind, ServerCommand, encode, parse_message

log = logging.getLogger("toco.fleet.commands")
BATCH = 500  # commands one tick sends at most (the next tick sends the rest)


class CommandOutbox:
    """``send`` publishes a command or keeps it when refused; ``tick`` sends what was kept."""

    def __init__(self, db: Database, send: SendFn) -> None:
        """``send(device_id, command)`` signs and publishes (CommandSigner.sender); raises PublishRefused."""
        self.db, self._send = db, send

    def send(self, device_id: str, command: ServerCommand) -> bool:
        """Publish ``command`` to ``device_id`` now, or keep it for the tick when the MQTT client refuses it.

        Returns True when published, False when kept. Raises what ``send`` raises but PublishRefused, and
        what the database raises while keeping it.
        """
        try:
            self._send(device_id, command)
            return True
        except PublishRefused as exc:
            with self.db.session(write=True) as s:
                s.add(UnsentCommandRow(device_id=device_id, command=encode(command), created_at=time.time(),
                                       attempts=1, last_error=str(exc)[:300]))
            log.warning("command refused by the MQTT client; kept and sent again by the leader's tick",
                        extra={"fields": {"device": device_id, "command": type(command).__name__,
                                              "cmd_id": command.cmd_id}})
            return False

    def count(self) -> int:
        """How many commands are kept, waiting to be sent."""
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(UnsentCommandRow)) or 0)

    def tick(self) -> int:
        """Send the kept commands, oldest first, deleting each one sent; stop at the first refusal (the rest
        waits for the next tick). A command for a device revoked or deleted meanwhile, or one that no
        longer parses, is dropped with a log line. Returns how many were sent. Raises what the database
        raises, and what ``send`` raises but PublishRefused.
        """
        sent = 0
        with self.db.session(write=True) as s:
            q = select(UnsentCommandRow).order_by(UnsentCommandRow.id).limit(BATCH)
            if s.get_bind().dialect.name == "postgresql":  # another replica's pass (a leader change) skips these
                q = q.with_for_update(skip_locked=True)
            rows = s.scalars(q).all()
            if not rows:
                return 0
            enrollment = dict(s.execute(select(DeviceRow.id, DeviceRow.enrollment).where(
                DeviceRow.id.in_(sorted({r.device_id for r in rows})))).all())
            for row in rows:
                if enrollment.get(row.device_id, REVOKED) == REVOKED:
                    log.info("kept command dropped: its device is revoked or gone",
                             extra={"fields": {"device": row.device_id}})
                    s.delete(row)
                    continue
                try:
                    command = parse_message(MessageKind.CMD, row.command)
                except MessageError as exc:
                    log.error("kept command dropped: it no longer parses",
                              extra={"fields": {"device": row.device_id, "error": str(exc)[:200]}})
                    s.delete(row)
                    continue
                try:
                    self._send(row.device_id, command)
                except PublishRefused as exc:
                    row.attempts += 1
                    row.last_error = str(exc)[:300]
                    break
                s.delete(row)  # with this pass's commit; the row stays locked from other passes until then
                sent += 1
        if sent:
            log.info("sent commands kept after a refusal", extra={"fields": {"commands": sent}})
        return sent
