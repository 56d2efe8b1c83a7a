"""The server's side of signed commands: every command leaves addressed, sequenced, expiring and signed.

Sits between the deployments / drift policy and the MQTT client (``send(device_id, command)``),
so no caller builds an envelope by hand. The active key of the keyring signs; a trust-keys
command is signed by the oldest key devices still trust, so one that has not heard of the newest
key yet accepts it (docs/protocol.md, "Key rotation").

The sequence is the wall clock in microseconds, raised to one above the last one handed out:
monotonic within a process and across restarts without a stored counter (a database restored
from a backup cannot roll it back, which would make every device refuse the server). It relies on
the server's clock not going back by more than the time since the last command.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet_server.keys import Keyring, keyring_path, load_keyring, load_ring_key
from toco_core.command_signing import sign_command
from toco_core.messages import ServerCommand, TrustKeysCommand

log = logging.getLogger("toco.fleet.commands")
SendFn = Callable[[str, ServerCommand], None]


class CommandSigner:
    """Signs commands with the keyring beside ``key_path``; rereads the ring when its file changes."""

    def __init__(self, key_path: Path, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        """``ttl_s``: seconds a command stays valid after it is signed. Raises BundleError for an unreadable ring."""
        self.key_path, self.ttl_s, self.clock = Path(key_path), ttl_s, clock
        self._lock = threading.Lock()
        self._last_seq = 0
        self._stamp: float | None = None
        self.ring: Keyring
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self.reload()

    # ---- the keyring ------------------------------------------------------------------------
    def _ring_stamp(self) -> float | None:
        try:
            return keyring_path(self.key_path).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def reload(self) -> bool:
        """Read the keyring again when ``keyring.json`` changed (a ``toco-fleet keys`` command ran).

        Returns whether it changed. Raises BundleError for an unreadable ring or a missing key file.
        """
        stamp = self._ring_stamp()
        with self._lock:
            if self._keys and stamp == self._stamp:
                return False
            ring = load_keyring(self.key_path)
            keys = {e.fingerprint: load_ring_key(self.key_path, ring, e.fingerprint)
                    for e in ring.keys if e.fingerprint == ring.active or e.trusted_at(self.clock())}
            self.ring, self._keys, self._stamp = ring, keys, stamp
        log.info("signing keys loaded", extra={"fields": {"active": ring.active, "trusted": sorted(keys)}})
        return True

    @property
    def active_key(self) -> Ed25519PrivateKey:
        """The key that signs commands and bundle manifests now."""
        with self._lock:
            return self._keys[self.ring.active]

    def rotated(self) -> bool:
        """Whether the ring has more than the original key (then devices get trust-keys commands)."""
        return len(self.ring.keys) > 1

    # ---- signing ------------------------------------------------------------------------------
    def next_sequence(self) -> int:
        """A sequence above every one handed out before (see the module's docstring)."""
        with self._lock:
            self._last_seq = max(self._last_seq + 1, int(self.clock() * 1e6))
            return self._last_seq

    def sign(self, device_id: str, command: ServerCommand) -> ServerCommand:
        """``command`` addressed to ``device_id``, with the next sequence, an expiry ``ttl_s`` ahead, signed.

        Trust-keys commands are signed by the oldest still-trusted key, every other by the active one.
        """
        now = self.clock()
        with self._lock:
            if isinstance(command, TrustKeysCommand):
                fp = next(e.fingerprint for e in self.ring.trusted(now) if e.fingerprint in self._keys)
            else:
                fp = self.ring.active
            key = self._keys[fp]
        return sign_command(command, key, device_id=device_id, sequence=self.next_sequence(),
                            expires_at=now + self.ttl_s)

    def sender(self, send: SendFn) -> SendFn:
        """``send`` wrapped so that every command it publishes is signed for its device first."""
        return lambda device_id, command: send(device_id, self.sign(device_id, command))
