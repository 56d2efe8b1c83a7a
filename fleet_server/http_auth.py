"""Who may call which route: bearer tokens, dashboard session cookies, CSRF, roles (an ASGI middleware).

Default deny: every request except PUBLIC needs an identity, so a route added later is protected
without anyone remembering to. The role a request needs comes from its method and path
(``needed_role``): reads need ``viewer``, writes ``operator``, token management ``admin``.

Two ways to present a token:

* ``Authorization: Bearer toco_...`` (the CLI, scripts): browsers never attach it on their own,
  so these requests need no CSRF check.
* the dashboard's session cookie ``toco_session`` (HttpOnly, SameSite=Strict, signed with
  itsdangerous, made by ``POST /login``): it names the token id and a random CSRF secret. A
  browser attaches it to any request to this host, so every state-changing request made with it
  must also carry the CSRF secret in the ``X-CSRF-Token`` header (the dashboard's script copies it
  from the readable ``toco_csrf`` cookie: double submit, checked against the signed session) and,
  when the browser sends ``Origin``, come from this origin. A cross-site form or a bodyless
  ``fetch`` can set neither the header nor the origin.

A revoked token ends its sessions at once: each request looks the token id up.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

from fastapi.responses import HTMLResponse, JSONResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer

from fleet_server.auth import identity_of, verify_token
from fleet_server.db import Database
from toco_core.atomic_files import atomic_write

SESSION_COOKIE = "toco_session"
CSRF_COOKIE = "toco_csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_MAX_AGE_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# reachable without a token: the health probe, and the login form that turns a token into a session
PUBLIC = frozenset({("GET", "/api/health"), ("HEAD", "/api/health"), ("GET", "/login"), ("POST", "/login"),
                    ("POST", "/logout")})


def needed_role(method: str, path: str) -> str:
    """The least role allowed to make this request: ``admin`` under /api/tokens, else ``viewer`` to read
    (GET, HEAD, OPTIONS) and ``operator`` for anything else. Raises nothing."""
    if path == "/api/tokens" or path.startswith("/api/tokens/"):
        return "admin"
    return "viewer" if method in SAFE_METHODS else "operator"


def load_session_secret(path: Path) -> bytes:
    """The key that signs dashboard session cookies, made on first use (32 random bytes, file mode 0600).

    Kept on disk so sessions survive a restart; deleting the file logs every browser out.
    Returns the key. Raises OSError when the file cannot be read or written.
    """
    path = Path(path)
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    atomic_write(path, secret, mode=0o600)
    os.chmod(path.parent, 0o700)
    return secret


class Sessions:
    """Signs and reads the dashboard's session cookie: ``{"tid": token id, "csrf": secret}``."""

    def __init__(self, secret: bytes, max_age_s: int = SESSION_MAX_AGE_S) -> None:
        self._signer = URLSafeTimedSerializer(secret, salt="toco-fleet-session")
        self.max_age_s = max_age_s

    def issue(self, token_id: str) -> tuple[str, str]:
        """A new session for ``token_id``. Returns ``(cookie value, csrf secret)``. Raises nothing."""
        csrf = secrets.token_urlsafe(32)
        return self._signer.dumps({"tid": token_id, "csrf": csrf}), csrf

    def read(self, value: str) -> dict | None:
        """The session in a cookie value; None if forged, altered or older than ``max_age_s``. Raises nothing."""
        try:
            data = self._signer.loads(value, max_age=self.max_age_s)
        except BadSignature:  # SignatureExpired is a BadSignature
            return None
        return data if isinstance(data, dict) and {"tid", "csrf"} <= data.keys() else None


def same_origin(origin: str, host: str) -> bool:
    """True when an ``Origin`` header names the host the request was sent to (any scheme). Raises nothing."""
    try:
        return urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


class AuthMiddleware:
    """ASGI middleware: refuses (401/403, JSON ``{"detail": ...}``) what the caller may not do, else
    passes the request on with ``request.state.identity`` set. ``login_page(next_path, error)`` renders
    the 401 answer to a browser's page load, so a browser lands on the login form."""

    def __init__(self, app, db: Database, sessions: Sessions, login_page) -> None:
        self.app, self.db, self.sessions, self.login_page = app, db, sessions, login_page

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if (method, path) in PUBLIC:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # the token lookup is a database read (and at most once a minute a write behind the writer lock):
        # off the event loop, so one slow lookup never stalls every other request and event stream
        ident, refusal = await asyncio.to_thread(self._identify, method, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if ident is None:
            await self._unauthenticated(method, path, headers)(scope, receive, send)
            return
        role = needed_role(method, path)
        if not ident.may(role):
            await _json(403, f"the token {ident.name!r} has role {ident.role}; this needs {role} or above")(
                scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = ident
        await self.app(scope, receive, send)

    def _identify(self, method: str, headers: dict[str, str]):
        """``(identity or None, refusal response or None)`` from the bearer token or the session cookie."""
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None, _json(401, "the Authorization header must be 'Bearer <token>'")
            ident = verify_token(self.db, token.strip())
            if ident is None:
                return None, _json(401, "the API token is unknown or revoked")
            return ident, None
        cookies = _cookies(headers.get("cookie", ""))
        if SESSION_COOKIE not in cookies:
            return None, None
        session = self.sessions.read(cookies[SESSION_COOKIE])
        ident = identity_of(self.db, session["tid"]) if session else None
        if ident is None or session is None:
            return None, None  # expired, forged or revoked: the same as no session, i.e. log in again
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, headers.get("host", "")):
                return None, _json(403, f"cross-origin request from {origin} refused")
            sent = headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), str(session["csrf"]).encode()):
                return None, _json(403, "missing or wrong CSRF token (X-CSRF-Token header); reload the dashboard")
        return ident, None

    def _unauthenticated(self, method: str, path: str, headers: dict[str, str]):
        if method == "GET" and "text/html" in headers.get("accept", "") and not path.startswith("/api/"):
            return HTMLResponse(self.login_page(path, None), status_code=401,
                                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
        return _json(401, "authentication required: send 'Authorization: Bearer <token>' "
                          "(make one with `toco-fleet tokens create`) or log in at /login")


def _cookies(raw: str) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is the same as none
        return {}
    return {k: m.value for k, m in jar.items()}


def _json(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)

