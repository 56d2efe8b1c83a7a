"""Where the ``toco-fleet`` CLI finds the API token it sends: ``TOCO_FLEET_TOKEN``, else a token file.

The file is ``$TOCO_FLEET_TOKEN_FILE`` if set, else ``$XDG_CONFIG_HOME/toco-fleet/token``
(``~/.config/toco-fleet/token``): one line, the token printed by ``toco-fleet tokens create``.
Keep it ``chmod 600``; a file others can read is refused, as the server's signing key is.
"""

from __future__ import annotations

import os
from pathlib import Path

from toco_core.errors import ConfigError

ENV = "TOCO_FLEET_TOKEN"
FILE_ENV = "TOCO_FLEET_TOKEN_FILE"


def token_file() -> Path:
    """The token file in effect (it may not exist). Raises nothing."""
    if os.environ.get(FILE_ENV):
        return Path(os.environ[FILE_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "toco-fleet" / "token"


def find_token() -> str | None:
    """The API token from ``TOCO_FLEET_TOKEN`` or the token file; None when neither has one.

    Raises ConfigError when the token file can be read by other users or cannot be read.
    """
    token = os.environ.get(ENV, "").strip()
    if token:
        return token
    path = token_file()
    if not path.is_file():
        return None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"the token file {path} can be read by other users", f"chmod 600 {path}")
    try:
        return path.read_text().strip() or None
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}", f"check {path}") from None
