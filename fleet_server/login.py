"""The dashboard's login: a form where the operator pastes an API token, which becomes a session cookie.

    GET  /login        the form (also the body of the 401 a browser gets for any page without a session)
    POST /login        form field ``token`` (and ``next``): sets the session and CSRF cookies, 303 to ``next``
    POST /logout       clears both cookies, 303 to /login
    GET  /api/session  who is logged in: token id, name, role
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from fleet_server.auth import verify_token
from fleet_server.http_auth import CSRF_COOKIE, SESSION_COOKIE, same_origin

_MAX_FORM_BYTES = 4096  # a token and a path; nothing bigger is read

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>TOCO Fleet: log in</title><link rel="icon" href="data:,">
<style>body{{font:15px system-ui,sans-serif;background:#f4f5f7;margin:0}}main{{max-width:28rem;margin:10vh auto;
background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}}input{{width:100%;box-sizing:border-box;
padding:.5rem;font:inherit;margin:.5rem 0 1rem}}button{{padding:.5rem 1.2rem;font:inherit}}.error{{color:#b00020}}
code{{background:#eee;padding:0 .2rem}}</style></head>
<body><main><h1>TOCO Fleet</h1>{error}
<form method="post" action="/login"><label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" required placeholder="toco_...">
<input type="hidden" name="next" value="{next}"><button type="submit">Log in</button></form>
<p>Make a token on the server with <code>toco-fleet tokens create --role operator</code>.</p></main></body></html>
"""

router = APIRouter(include_in_schema=False)


def login_page(next_path: str, error: str | None) -> str:
    """The login form, returning to ``next_path`` after a login; ``error`` is shown above it. Raises nothing."""
    err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return _PAGE.format(error=err, next=html.escape(_local(next_path), quote=True))


def _local(path: str) -> str:
    # only a path on this server: "//evil.example" or "https://..." would make the login an open redirect
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(next: str = "/") -> HTMLResponse:  # noqa: A002 - the query parameter's name
    """The login form."""
    return HTMLResponse(login_page(next, None), headers={"Cache-Control": "no-store"})


@router.post("/login")
async def login(request: Request):
    """Check the pasted token; on success set the session (HttpOnly) and CSRF (readable) cookies."""
    origin = request.headers.get("origin")
    if origin is not None and not same_origin(origin, request.headers.get("host", "")):
        # a foreign page must not log a browser in with the attacker's token (login CSRF)
        return HTMLResponse(login_page("/", "Log in from this server's own page."), status_code=403)
    if int(request.headers.get("content-length") or 0) > _MAX_FORM_BYTES:
        return HTMLResponse(login_page("/", "That is not an API token."), status_code=413)
    form = await request.form(max_files=0, max_fields=4)
    token, next_path = str(form.get("token") or "").strip(), _local(str(form.get("next") or "/"))
    server = request.app.state.server
    ident = verify_token(server.db, token)
    if ident is None:
        return HTMLResponse(login_page(next_path, "That token is unknown or revoked."), status_code=401,
                            headers={"Cache-Control": "no-store"})
    value, csrf = request.app.state.sessions.issue(ident.token_id)
    secure = request.url.scheme == "https"
    resp = RedirectResponse(next_path, status_code=303)
    max_age = request.app.state.sessions.max_age_s
    resp.set_cookie(SESSION_COOKIE, value, max_age=max_age, httponly=True, samesite="strict", secure=secure)
    # readable by the dashboard's script, which echoes it in X-CSRF-Token; useless without the session cookie
    resp.set_cookie(CSRF_COOKIE, csrf, max_age=max_age, httponly=False, samesite="strict", secure=secure)
    return resp


@router.post("/logout")
def logout() -> RedirectResponse:
    """Forget the session in this browser (the token itself stays valid; revoke it to end every session)."""
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
    resp.delete_cookie(CSRF_COOKIE, samesite="strict")
    return resp


@router.get("/api/session")
def session(request: Request) -> dict:
    """Who this request authenticated as: ``{"token_id", "name", "role"}``."""
    ident = request.state.identity
    return {"token_id": ident.token_id, "name": ident.name, "role": ident.role}
