"""Telling devices which keys to trust after a rotation: a trust-keys command to every online device.

Run from the server's housekeeping loop. Once the keyring holds more than the original key, each
online device gets the current trusted set whenever that set changes (a rotation, a key retired by
time or by ``toco-fleet keys retire``) and again after each of its births (it may have been offline
when the set changed). What was sent is kept in memory only: after a server restart every online
device gets the set once more, which is harmless.

A command the MQTT client refuses (PublishRefused) is not marked sent: the pass stops there with a
warning and the next tick, which derives again who lacks the current set, sends it and the rest. No
outbox is needed (fleet_server.command_outbox is the drift policy's): the set to push is the ring's
state, re-read every tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select

from fleet_server.command_signer import CommandSigner, SendFn
from fleet_server.db import Database, DeviceRow, new_id
from fleet_server.mqtt_client import PublishRefused
from toco_core.messages import TrustKeysCommand

log = logging.getLogger("toco.fleet.keys")


class KeyDistributor:
    """Pushes the trusted key set; ``on_reload`` gets the new active key when the ring changed."""

    def __init__(self, db: Database, signer: CommandSigner, send: SendFn,
                 on_reload: Callable[[object], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        """``send(device_id, command)`` must sign (CommandSigner.sender)."""
        self.db, self.signer, self.send, self.on_reload, self.clock = db, signer, send, on_reload, clock
        self._sent: dict[str, tuple[int, tuple[str, ...]]] = {}  # device -> (birth, fingerprints) last pushed

    def reload(self) -> None:
        """Reload the ring if it changed (``on_reload`` then gets the new active key); sends nothing.

        What a replica that is not the leader runs: it signs commands too, with the current key.
        """
        if self.signer.reload() and self.on_reload is not None:
            self.on_reload(self.signer.active_key)

    def tick(self) -> int:
        """Reload the ring if it changed and push the set to devices that lack it, stopping at a refused publish.
        Returns how many were sent."""
        self.reload()
        if not self.signer.rotated():
            return 0
        keys = self.signer.ring.trusted_keys(self.clock())
        fps = tuple(k.fingerprint for k in keys)
        with self.db.session() as s:
            online = s.execute(select(DeviceRow.id, DeviceRow.birth).where(DeviceRow.online.is_(True))).all()
        sent = 0
        for device_id, birth in online:
            if self._sent.get(device_id) == (birth, fps):
                continue
            try:
                self.send(device_id, TrustKeysCommand(cmd_id=new_id("k"), keys=keys))
            except PublishRefused as exc:  # not marked: the next tick sends it, and the rest
                log.warning("trusted key set refused by the MQTT client; the next tick sends it again",
                            extra={"fields": {"device": device_id, "sent": sent, "error": str(exc)[:200]}})
                break
            self._sent[device_id] = (birth, fps)
            sent += 1
        if sent:
            log.info("sent the trusted key set", extra={"fields": {"devices": sent, "keys": list(fps)}})
        return sent
