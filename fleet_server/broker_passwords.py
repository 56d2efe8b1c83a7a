"""A mosquitto password file, written with ``mosquitto_passwd`` (PBKDF2-SHA512 hashes, mosquitto's own format).

The password never appears on a command line (``mosquitto_passwd`` reads it from stdin, so ``ps``
cannot show it) and the generated one is written only to a 0600 file for provisioning the box,
as deploy/mosquitto/add-device.sh does. mosquitto reads the file again on SIGHUP (``--reload``).
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from toco_core.atomic_files import atomic_write
from toco_core.errors import ConfigError


class BrokerCredentialsError(ConfigError):
    """Raised when a broker password cannot be written, removed or reloaded."""


def _tool() -> str:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        raise BrokerCredentialsError("mosquitto_passwd not found",
                                     "apt-get install mosquitto, or leave out --passwd when the broker's users "
                                     "are managed elsewhere")
    return exe


def new_password() -> str:
    """32 random bytes, base64url without padding: no ':' (mosquitto's separator), safe in any file."""
    return secrets.token_urlsafe(32)


def set_password(passwd_file: Path, user: str, password: str) -> None:
    """Add ``user`` to ``passwd_file`` (created if missing) or replace its password.

    Raises BrokerCredentialsError when mosquitto_passwd is missing or fails, or the password has a ':'.
    """
    if ":" in password or "\n" in password or not password:
        raise BrokerCredentialsError("a broker password may not be empty or contain ':' or a newline",
                                     "mosquitto's password file uses them as separators")
    passwd_file.parent.mkdir(parents=True, exist_ok=True)
    create = [] if passwd_file.exists() and passwd_file.stat().st_size else ["-c"]
    # asked twice, both answers read from stdin when it is not a terminal
    r = subprocess.run([_tool(), *create, str(passwd_file), user], input=f"{password}\n{password}\n",
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise BrokerCredentialsError(f"mosquitto_passwd could not write {user!r} to {passwd_file}: "
                                     f"{(r.stderr or r.stdout).strip()[:200]}", "check the path and its permissions")
    _share_with_broker(passwd_file)


def remove_user(passwd_file: Path, user: str) -> bool:
    """Delete ``user`` from ``passwd_file``. Returns False when it was not there (nothing to do).

    Raises BrokerCredentialsError when mosquitto_passwd fails on a user that is there.
    """
    if not passwd_file.exists() or not has_user(passwd_file, user):
        return False
    r = subprocess.run([_tool(), "-D", str(passwd_file), user], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise BrokerCredentialsError(f"mosquitto_passwd could not remove {user!r} from {passwd_file}: "
                                     f"{(r.stderr or r.stdout).strip()[:200]}", "check the path and its permissions")
    _share_with_broker(passwd_file)
    return True


def has_user(passwd_file: Path, user: str) -> bool:
    """Whether ``passwd_file`` holds a line for ``user``."""
    if not passwd_file.exists():
        return False
    return any(line.split(":", 1)[0] == user for line in passwd_file.read_text().splitlines())


def write_password_out(path: Path, password: str) -> None:
    """Write a generated password to ``path`` with mode 0600, for copying to the box (then deleting here)."""
    atomic_write(path, (password + "\n").encode(), mode=0o600)


def reload_mosquitto() -> None:
    """``systemctl reload mosquitto`` (a SIGHUP), so a new or removed password counts at once.

    Raises BrokerCredentialsError when mosquitto is not a running systemd service here.
    """
    systemctl = shutil.which("systemctl")
    if systemctl is None or subprocess.run([systemctl, "is-active", "--quiet", "mosquitto"]).returncode != 0:
        raise BrokerCredentialsError("mosquitto is not a running systemd service here",
                                     "send SIGHUP to your mosquitto process yourself")
    r = subprocess.run([systemctl, "reload", "mosquitto"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BrokerCredentialsError(f"systemctl reload mosquitto failed: {r.stderr.strip()[:200]}")


def _share_with_broker(passwd_file: Path) -> None:
    # mosquitto drops to its own user and must read the file; nobody else needs to (hashes only)
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        gid = None
    if gid is not None and os.geteuid() == 0:
        os.chown(passwd_file, -1, gid)
        os.chmod(passwd_file, 0o640)
    else:
        os.chmod(passwd_file, 0o644)  # readable so a broker not running as root can load it
