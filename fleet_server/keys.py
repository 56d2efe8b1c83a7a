"""The server's Ed25519 signing key: generated on first start, kept 0600, its public half beside it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from toco_core.bundle import generate_private_key, key_fingerprint, load_private_key, save_private_key, save_public_key
from toco_core.errors import BundleError

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
        log.warning("generated a new bundle signing key", extra={"fields": {"path": str(path),
                                                                           "fingerprint": key_fingerprint(key.public_key())}})
    pub = public_key_path(path)
    if not pub.exists():
        save_public_key(key, pub)
    return key
