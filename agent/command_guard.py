"""Whether the agent runs a command: signed by a trusted key, for this device, not expired, not a replay.

The cheap checks run in the daemon, in an order that never spends a child process on a command
that fails one: envelope present, this device, not expired, sequence above the highest taken,
signer in the key set. The Ed25519 signature is then checked in a child task
(agent.child_tasks.verify_command), which keeps cryptography out of the daemon
(docs/agent_memory.md). A refusal is counted per reason in trust.json (shown by ``toco-agent
status`` and sent with telemetry) and logged on one line; it is never answered on the wire,
so a duplicate QoS 1 delivery of a deploy cannot fail the deployment it belongs to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

from agent.trust_store import TrustStore
from toco_core.errors import SignatureError, TocoError
from toco_core.messages import ServerCommand, TrustKeysCommand

log = logging.getLogger("toco.agent.commands")


class Refusal(StrEnum):
    """Why a command was refused; the keys of the refusal counters."""

    UNSIGNED = "unsigned"
    FOREIGN_DEVICE = "foreign_device"
    EXPIRED = "expired"
    REPLAY = "replay"
    UNTRUSTED_KEY = "untrusted_key"
    BAD_SIGNATURE = "bad_signature"


class CommandRefused(TocoError):
    """Raised by CommandGuard.admit: ``reason`` (a Refusal) and a one-line message."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CommandGuard:
    """Admits or refuses this device's commands; ``verify(command)`` checks the signature (a child task)."""

    def __init__(self, device_id: str, trust: TrustStore, verify: Callable[[ServerCommand], object],
                 clock: Callable[[], float] = time.time) -> None:
        """``verify`` raises SignatureError for a bad signature, TocoError when the check could not run."""
        self.device_id, self.trust, self.verify, self.clock = device_id, trust, verify, clock

    def check(self, cmd: ServerCommand) -> None:
        """Every check, without recording anything. Raises CommandRefused with the first that fails."""
        if not cmd.signature or not cmd.signer:
            raise CommandRefused(Refusal.UNSIGNED, f"command {cmd.cmd_id} is unsigned")
        if cmd.device_id != self.device_id:
            raise CommandRefused(Refusal.FOREIGN_DEVICE,
                                 f"command {cmd.cmd_id} is for device {cmd.device_id!r}, not {self.device_id!r}")
        if cmd.expires_at is None or cmd.sequence is None:
            raise CommandRefused(Refusal.UNSIGNED, f"command {cmd.cmd_id} lacks its expiry or sequence")
        now = self.clock()
        if now > cmd.expires_at:
            raise CommandRefused(Refusal.EXPIRED, f"command {cmd.cmd_id} expired {now - cmd.expires_at:.0f} s ago "
                                                  "(or this box's clock is ahead)")
        highest = self.trust.state.highest_command
        if cmd.sequence <= highest:
            raise CommandRefused(Refusal.REPLAY, f"command {cmd.cmd_id} has sequence {cmd.sequence}, not above the "
                                                 f"{highest} already accepted (a replay or a duplicate delivery)")
        if cmd.signer not in self.trust.fingerprints():
            raise CommandRefused(Refusal.UNTRUSTED_KEY, f"command {cmd.cmd_id} is signed by key {cmd.signer}, not "
                                                        f"trusted here ({', '.join(self.trust.fingerprints())})")
        try:
            self.verify(cmd)
        except SignatureError as exc:
            raise CommandRefused(Refusal.BAD_SIGNATURE, exc.message) from None
        except TocoError as exc:  # the check could not run: refuse, never run a command unchecked
            raise CommandRefused(Refusal.BAD_SIGNATURE, f"signature of {cmd.cmd_id} not checked: {exc}") from None

    def admit(self, cmd: ServerCommand) -> bool:
        """Check ``cmd``; on success record its sequence (and a trust-keys command's key set) and return True;
        on refusal count and log it and return False."""
        try:
            self.check(cmd)
        except CommandRefused as exc:
            self.trust.count_refusal(exc.reason.value)
            log.warning(f"refused command: {exc.reason.value}: {exc.message}",
                        extra={"fields": {"cmd": cmd.cmd_id, "reason": exc.reason.value}})
            return False
        self.trust.accept_command(cmd.sequence)  # type: ignore[arg-type]
        if isinstance(cmd, TrustKeysCommand):
            self.trust.replace_keys(cmd.keys)
            log.warning("trusted key set replaced", extra={"fields": {"keys": [k.fingerprint for k in cmd.keys],
                                                                      "signer": cmd.signer}})
        return True
