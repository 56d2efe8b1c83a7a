"""The server's Ed25519 signing keys: the original one generated on first start (0600, its public half
beside it), and the keyring that rotation adds (``toco-fleet keys rotate``, docs/protocol.md "Key rotation")."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from toco_core.atomic_files import atomic_write
from toco_core.bundle import (
    generate_private_key,
    key_fingerprint,
    load_private_key,
    public_key_raw,
    save_private_key,
    save_public_key,
)
from toco_core.errors import BundleError
from toco_core.messages import TrustedKey

log = logging.getLogger("toco.fleet.keys")


def public_key_path(private_path: Path) -> Path:
    """``server.pem`` -> ``server.pub.pem``: the file agents are provisioned with."""
    return private_path.with_name(private_path.stem + ".pub.pem")


def ensure_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at ``path``, or generate and save it (0600, directory 0700) when it does not exist.

    Raises BundleError when an existing key file is readable by others or is not an Ed25519 PEM.
    """
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise BundleError(f"signing key {path} has permissions {oct(mode)}; others can read it",
                              f"chmod 600 {path}")
        key = load_private_key(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        key = generate_private_key()
        save_private_key(key, path)
        log.warning("generated a new bundle signing key",
                    extra={"fields": {"path": str(path), "fingerprint": key_fingerprint(key.public_key())}})
    pub = public_key_path(path)
    if not pub.exists():
        save_public_key(key, pub)
    return key


# ---------------------------------------------------------------------------- rotation
KEYRING_FILE = "keyring.json"


class KeyEntry(BaseModel):
    """One signing key of the ring: its file (beside keyring.json), public half and retirement time."""

    model_config = ConfigDict(extra="forbid")
    fingerprint: str
    file: str = Field(description="PEM file name in the keys folder")
    public_key: str = Field(description="raw public key, hex")
    created_at: float
    retire_at: float | None = Field(None, description="unix seconds from which devices stop trusting it; None = never")

    def trusted_at(self, now: float) -> bool:
        """Whether devices still trust this key at ``now``."""
        return self.retire_at is None or now < self.retire_at


class Keyring(BaseModel):
    """The server's signing keys: the active one signs everything; older ones stay trusted until retired.

    Stored as ``keyring.json`` beside the original key (``server.pem``); without that file the ring
    is the original key alone (a server that never rotated).
    """

    model_config = ConfigDict(extra="forbid")
    active: str = Field(description="fingerprint of the key that signs")
    keys: list[KeyEntry]

    def entry(self, fingerprint: str) -> KeyEntry:
        """The entry of ``fingerprint``. Raises BundleError when the ring has no such key."""
        for e in self.keys:
            if e.fingerprint == fingerprint:
                return e
        raise BundleError(f"no signing key {fingerprint} in the keyring", "see `toco-fleet keys list`")

    def trusted(self, now: float) -> list[KeyEntry]:
        """Entries devices should trust at ``now``: the active key and those not retired yet, oldest first."""
        return sorted((e for e in self.keys if e.fingerprint == self.active or e.trusted_at(now)),
                      key=lambda e: e.created_at)

    def trusted_keys(self, now: float) -> list[TrustedKey]:
        """The device-side form of :meth:`trusted` (what a trust-keys command carries)."""
        return [TrustedKey(fingerprint=e.fingerprint, public_key=e.public_key) for e in self.trusted(now)]


def keyring_path(private_path: Path) -> Path:
    """``keys/server.pem`` -> ``keys/keyring.json``."""
    return Path(private_path).with_name(KEYRING_FILE)


def load_keyring(private_path: Path) -> Keyring:
    """The keyring beside the original key ``private_path`` (generated first if missing, as ensure_signing_key).

    Raises BundleError for a key file readable by others or an unreadable keyring.json.
    """
    key = ensure_signing_key(private_path)
    ring_file = keyring_path(private_path)
    if not ring_file.exists():
        fp = key_fingerprint(key.public_key())
        return Keyring(active=fp, keys=[KeyEntry(fingerprint=fp, file=Path(private_path).name,
                                                 public_key=public_key_raw(key.public_key()).hex(),
                                                 created_at=Path(private_path).stat().st_mtime)])
    try:
        return Keyring.model_validate_json(ring_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"keyring {ring_file} is unreadable: {exc}", "restore it from a backup") from None


def load_ring_key(private_path: Path, ring: Keyring, fingerprint: str) -> Ed25519PrivateKey:
    """The private key ``fingerprint`` of ``ring`` (its file lies beside ``private_path``).

    Raises BundleError when the ring has no such key, or its file is missing, readable by others or not Ed25519.
    """
    path = Path(private_path).with_name(ring.entry(fingerprint).file)
    if not path.exists():
        raise BundleError(f"the key file {path} of signing key {fingerprint} is missing",
                          "restore the keys folder from a backup")
    return ensure_signing_key(path)


def save_keyring(private_path: Path, ring: Keyring) -> None:
    """Write ``keyring.json`` atomically (0600, like the keys)."""
    atomic_write(keyring_path(private_path), ring.model_dump_json(indent=1).encode(), 0o600)


def rotate_key(private_path: Path, overlap_s: float, now: float | None = None) -> Keyring:
    """Make a new signing key the active one; every key trusted so far is retired ``overlap_s`` from now.

    Devices learn the new key from a trust-keys command signed by the oldest key they still
    trust (fleet_server.key_distribution), so they must be reached within the overlap.
    Returns the new ring. Raises BundleError as load_keyring, ValueError for a negative overlap.
    """
    if overlap_s < 0:
        raise ValueError("the overlap must not be negative")
    now = time.time() if now is None else now
    ring = load_keyring(private_path)
    key = generate_private_key()
    fp = key_fingerprint(key.public_key())
    name = f"server-{fp}.pem"
    save_private_key(key, Path(private_path).with_name(name))
    save_public_key(key, public_key_path(Path(private_path).with_name(name)))  # for provisioning new devices
    for e in ring.keys:
        if e.trusted_at(now):
            e.retire_at = min(now + overlap_s, e.retire_at) if e.retire_at is not None else now + overlap_s
    ring.keys.append(KeyEntry(fingerprint=fp, file=name, public_key=public_key_raw(key.public_key()).hex(),
                              created_at=now))
    ring.active = fp
    save_keyring(private_path, ring)
    log.warning("rotated the signing key", extra={"fields": {"active": fp, "overlap_s": overlap_s}})
    return ring


def retire_key(private_path: Path, fingerprint: str, now: float | None = None) -> Keyring:
    """Retire ``fingerprint`` now (devices drop it at their next trust-keys command). Returns the ring.

    Raises BundleError for an unknown key or the active one (rotate first).
    """
    ring = load_keyring(private_path)
    entry = ring.entry(fingerprint)
    if fingerprint == ring.active:
        raise BundleError(f"key {fingerprint} is the active signing key", "rotate to a new key first")
    entry.retire_at = time.time() if now is None else now
    save_keyring(private_path, ring)
    return ring
