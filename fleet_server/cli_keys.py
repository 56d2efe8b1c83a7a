"""``toco-fleet keys``: list, rotate and retire the server's signing keys (offline, on ``--data-dir``).

They edit ``keys/keyring.json``; a running server rereads it within a tick, signs with the new key
from then on and sends every online device the new trusted set (fleet_server.key_distribution).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table

from toco_core.cli_support import cli_errors, console
from toco_core.errors import ConfigError

keys_app = typer.Typer(help="The server's Ed25519 signing keys: list, rotate with an overlap, retire.",
                       no_args_is_help=True)
DATA_DIR = typer.Option(Path("fleet-data"), help="the server's data directory (keys/ inside)")
KEY_PATH = typer.Option(None, "--key-path", help="the original signing key, instead of {data-dir}/keys/server.pem")


def _key_path(data_dir: Path, key_path: Path | None) -> Path:
    path = key_path or data_dir / "keys" / "server.pem"
    if not path.exists():
        raise ConfigError(f"no signing key at {path}",
                          "check --data-dir / --key-path (the server makes it on first start)")
    return path


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def overlap_seconds(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` (or plain seconds) as seconds.

    Raises ConfigError for anything else or a negative value.
    """
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise ConfigError(f"overlap {text!r} is not a duration", "write it like 90s, 30m, 24h or 7d") from None
    if value < 0:
        raise ConfigError(f"overlap {text!r} is negative", "give 0 or more")
    return value


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@keys_app.command("list")
@cli_errors
def keys_list(data_dir: Path = DATA_DIR, key_path: Path | None = KEY_PATH) -> None:
    """The keyring: which key signs, which are trusted until when, which are retired."""
    from fleet_server.keys import load_keyring

    ring = load_keyring(_key_path(data_dir, key_path))
    now = time.time()
    t = Table("fingerprint", "state", "created", "retired from", "file")
    for e in ring.keys:
        state = "active" if e.fingerprint == ring.active else "trusted" if e.trusted_at(now) else "retired"
        t.add_row(e.fingerprint, state, _when(e.created_at), _when(e.retire_at), e.file)
    console.print(t)


@keys_app.command("rotate")
@cli_errors
def keys_rotate(overlap: str = typer.Option("7d", help="how long devices keep trusting the old key(s), e.g. 24h, 7d"),
                data_dir: Path = DATA_DIR, key_path: Path | None = KEY_PATH) -> None:
    """Make a new signing key the active one; the old one stays trusted for the overlap, then is retired."""
    from fleet_server.keys import public_key_path, rotate_key

    path = _key_path(data_dir, key_path)
    ring = rotate_key(path, overlap_seconds(overlap))
    new = ring.entry(ring.active)
    console.print(f"new signing key {ring.active}; older keys retire at "
                  f"{_when(max(e.retire_at or 0 for e in ring.keys if e.fingerprint != ring.active))}")
    console.print(f"provision new devices with {public_key_path(path.with_name(new.file))}; a running server "
                  "sends online devices the new key set within a second")


@keys_app.command("retire")
@cli_errors
def keys_retire(fingerprint: str, data_dir: Path = DATA_DIR, key_path: Path | None = KEY_PATH) -> None:
    """Retire a key now (not the active one): devices stop trusting it at their next trust-keys command."""
    from fleet_server.keys import retire_key

    retire_key(_key_path(data_dir, key_path), fingerprint)
    console.print(f"key {fingerprint} retired")
