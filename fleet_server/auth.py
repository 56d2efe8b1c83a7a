"""API tokens and roles: who may call the fleet API and the dashboard, and what they may do.

A token is ``toco_{id}_{secret}``: ``id`` (12 hex) is public and finds the row, ``secret`` is 32
random bytes (``secrets.token_urlsafe``). Only the SHA-256 of the whole token is stored. A fast
hash is the standard choice here (as for GitHub or PyPI tokens): a 256-bit random secret cannot
be guessed offline, so a slow password hash would only cost CPU on every request. The stored
hash is compared with ``hmac.compare_digest`` (constant time).

Roles are ranked: ``viewer`` reads, ``operator`` also changes the fleet (add models, analyse,
deploy, roll back, approve), ``admin`` also manages tokens. Tokens are made offline on the
database (``toco-fleet tokens create``), so the first admin token exists before the server runs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from fleet_server.db import ApiTokenRow, Database
from toco_core.errors import ConfigError, TocoError

ROLES = ("viewer", "operator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}
_TOKEN = re.compile(r"^toco_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# last_used_at is for people ("is this token still used?"); minute precision spares a write per request
_TOUCH_EVERY_S = 60.0


class TokenNotFoundError(TocoError):
    """Raised when a token id names no token."""


@dataclass(frozen=True)
class Identity:
    """Who made a request: the token's id, name and role."""

    token_id: str
    name: str
    role: str

    def may(self, needed: str) -> bool:
        """True when this identity's role is ``needed`` or above. Raises KeyError for an unknown role."""
        return _RANK[self.role] >= _RANK[needed]


def check_role(role: str) -> str:
    """Returns ``role`` if it is one of ROLES. Raises ConfigError naming the valid roles otherwise."""
    if role not in _RANK:
        raise ConfigError(f"unknown role {role!r}", f"use one of {', '.join(ROLES)}")
    return role


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, *, role: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Make a new token with ``role``.

    Returns ``(token, view)``: the token itself, which is shown once and never stored, and its
    list view. Raises ConfigError for an unknown role or a name over 100 characters.
    """
    check_role(role)
    name = name or f"{role} token"
    if len(name) > 100:
        raise ConfigError("a token name is at most 100 characters", "give a shorter --name")
    token_id = secrets.token_hex(6)
    token = f"toco_{token_id}_{secrets.token_urlsafe(32)}"
    row = ApiTokenRow(id=token_id, name=name, role=role, token_hash=_digest(token), created_at=time.time())
    with db.session(write=True) as s:
        s.add(row)
    return token, _view(row)


def list_tokens(db: Database) -> list[dict[str, Any]]:
    """Every token, oldest first, as list views (id, name, role, created, last used, revoked); never the secret."""
    with db.session() as s:
        return [_view(r) for r in s.scalars(select(ApiTokenRow).order_by(ApiTokenRow.created_at))]


def revoke_token(db: Database, *, token_id: str) -> dict[str, Any]:
    """Revoke a token: it and every dashboard session made with it stop working at once.

    Returns its view. Raises TokenNotFoundError for an unknown id. Revoking twice keeps the first time.
    """
    with db.session(write=True) as s:
        row = s.get(ApiTokenRow, token_id)
        if row is None:
            raise TokenNotFoundError(f"no API token {token_id!r}", "see `toco-fleet tokens list`")
        row.revoked_at = row.revoked_at or time.time()
        return _view(row)


def verify_token(db: Database, token: str) -> Identity | None:
    """The identity of a presented bearer token; None for a malformed, unknown or revoked token. Raises nothing."""
    m = _TOKEN.match(token)
    if m is None:
        return None
    return _identity(db, m.group(1), _digest(token))


def identity_of(db: Database, token_id: str) -> Identity | None:
    """The identity of a token id from a signed session cookie; None if unknown or revoked. Raises nothing."""
    return _identity(db, token_id, None)


def _identity(db: Database, token_id: str, digest: str | None) -> Identity | None:
    with db.session() as s:
        row = s.get(ApiTokenRow, token_id)
        if row is None or row.revoked_at is not None:
            return None
        if digest is not None and not hmac.compare_digest(row.token_hash, digest):
            return None
        ident = Identity(row.id, row.name, row.role)
        stale = row.last_used_at is None or time.time() - row.last_used_at > _TOUCH_EVERY_S
    if stale:
        with db.session(write=True) as s:
            row = s.get(ApiTokenRow, token_id)
            if row is not None:  # deleted since it was read: nothing to touch
                row.last_used_at = time.time()
    return ident


def _view(row: ApiTokenRow) -> dict[str, Any]:
    return {"token_id": row.id, "name": row.name, "role": row.role, "created_at": row.created_at,
            "last_used_at": row.last_used_at, "revoked_at": row.revoked_at}
