"""Signing and verifying a server command's envelope (the pure part; no I/O, no clock).

A signed command carries the target ``device_id``, a ``deployment_id`` (when it belongs to one),
``expires_at``, a server-wide monotonic ``sequence``, the ``signer``'s key fingerprint and an
Ed25519 ``signature`` over :func:`canonical_command_bytes`: the command's JSON without
``signature``, keys sorted, compact, UTF-8 (the same rule as bundle manifests). The checks that
need the device's state (its id, the clock, the highest sequence taken) are the agent's
(agent.command_guard); this module only proves who wrote the bytes.

Imports cryptography: the agent daemon calls it only in a child task (agent.child_tasks).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toco_core.bundle import key_fingerprint
from toco_core.errors import SignatureError
from toco_core.messages import ServerCommand, TrustedKey

ENVELOPE = ("device_id", "expires_at", "sequence", "signer", "signature")


CommandSignatureError = SignatureError  # defined in toco_core.errors so the daemon knows it without cryptography


def canonical_command_bytes(command: ServerCommand) -> bytes:
    """The signed bytes of ``command``: its JSON without ``signature``, sorted keys, compact, UTF-8.

    Raises CommandSignatureError when a field holds a value JSON cannot carry exactly (NaN, inf).
    """
    body = command.model_dump(mode="json", exclude={"signature"})
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise CommandSignatureError(f"command {command.cmd_id} cannot be signed: {exc}", "use finite numbers") from None


def sign_command(command: ServerCommand, private_key: Ed25519PrivateKey, *, device_id: str, sequence: int,
                 expires_at: float) -> ServerCommand:
    """A copy of ``command`` addressed to ``device_id`` with ``sequence`` and ``expires_at``, signed.

    Takes the command (any deployment id it carries is kept), the server's key and the envelope
    values; returns the signed copy (same class). Raises CommandSignatureError as
    canonical_command_bytes does.
    """
    unsigned = command.model_copy(update={"device_id": device_id, "sequence": sequence, "expires_at": expires_at,
                                          "signer": key_fingerprint(private_key.public_key()), "signature": None})
    sig = private_key.sign(canonical_command_bytes(unsigned))
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


def public_keys(trusted: Iterable[TrustedKey]) -> dict[str, Ed25519PublicKey]:
    """``{fingerprint: key}`` of a trusted key set. Raises CommandSignatureError for a key that is not Ed25519."""
    try:
        return {k.fingerprint: Ed25519PublicKey.from_public_bytes(bytes.fromhex(k.public_key)) for k in trusted}
    except ValueError as exc:
        raise CommandSignatureError(f"a trusted key is not an Ed25519 key: {exc}",
                                    "provision the key set again") from None


def verify_command(command: ServerCommand, keys: dict[str, Ed25519PublicKey]) -> str:
    """Check ``command``'s signature against the trusted ``keys`` (``{fingerprint: key}``).

    Returns the signer's fingerprint. Raises CommandSignatureError when the command is unsigned,
    names a signer not among ``keys`` (never trusted, or retired), or its signature is garbled or
    does not verify.
    """
    if not command.signature or not command.signer:
        raise CommandSignatureError(f"command {command.cmd_id} is unsigned",
                                    "only the fleet server's signed commands run")
    key = keys.get(command.signer)
    if key is None:
        raise CommandSignatureError(f"command {command.cmd_id} is signed by key {command.signer}, which this device "
                                    f"does not trust (trusted: {', '.join(sorted(keys)) or 'none'})",
                                    "a retired or foreign key; "
                                    "re-provision the device if the server's key is new to it")
    try:
        sig = base64.b64decode(command.signature, validate=True)
        key.verify(sig, canonical_command_bytes(command))
    except (ValueError, InvalidSignature):
        raise CommandSignatureError(f"command {command.cmd_id} has a bad signature (key {command.signer})",
                                    "the command was altered, or not written by the fleet server") from None
    return command.signer
