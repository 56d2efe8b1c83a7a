"""The http_fleet API refuses what the caller may not do: anonymous (401), the wrong role (403), a foreign
Host (DNS rebinding), cross-site cookie requests (CSRF). Against a real `toco-fleet serve` process."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute

from tests.security.http.conftest import cli

PUBLIC = {("GET", "/api/health"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}


def app_routes(tmp_path) -> list[tuple[str, str]]:
    """(method, path with every parameter filled) of every route the app serves, read from the app itself,
    so a route added later is covered without editing this test."""
    from fleet_server.api import create_app
    from fleet_server.config import FleetSettings
    from fleet_server.server import FleetServer

    server = FleetServer(FleetSettings(data_dir=tmp_path / "routes"))  # built, never started
    try:
        app = create_app(server)
    finally:
        server.db.close()
    out = []
    for prefix, route in _flatten(app.routes, ""):
        methods = route.methods if isinstance(route, APIRoute) else getattr(route, "methods", None) or {"GET"}
        path = re.sub(r"\{[^}]+\}", "x-1", prefix + route.path)
        out += [(m, path) for m in sorted(methods or ()) if m != "HEAD"]
    assert len(out) > 25 and ("POST", "/api/models") in out and ("GET", "/docs") in out
    return out


def _flatten(routes, prefix: str):
    # FastAPI keeps an included router as one entry holding the router's own routes
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flatten(inner.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
        else:
            yield prefix, route


def test_every_route_but_health_and_login_refuses_anonymous_and_bad_tokens(http_fleet, tmp_path):
    routes = app_routes(tmp_path)
    anon = http_fleet.client(None)
    forged = http_fleet.client("toco_0123456789ab_" + "A" * 43)
    let_through = []
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        for client in (anon, forged):
            r = client.request(method, path)
            if r.status_code != 401:
                let_through.append((method, path, r.status_code))
        assert r.json()["detail"] == "the API token is unknown or revoked"
    assert not let_through
    assert anon.get("/api/health").status_code == 200
    r = anon.get("/api/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    # a browser loading a page gets the login form with the 401
    r = anon.get("/devices/cam-1", headers={"Accept": "text/html"})
    assert r.status_code == 401 and 'action="/login"' in r.text and 'value="/devices/cam-1"' in r.text


def test_roles_viewer_reads_operator_writes(http_fleet, tmp_path):
    viewer, operator = http_fleet.client(http_fleet.tokens["viewer"]), http_fleet.client(http_fleet.tokens["operator"])
    writes = [(m, p) for m, p in app_routes(tmp_path) if m != "GET" and (m, p) not in PUBLIC]
    assert ("POST", "/api/deployments/x-1/rollback") in writes
    for method, path in writes:
        r = viewer.request(method, path)
        assert r.status_code == 403 and "role viewer" in r.json()["detail"], (method, path)
        assert operator.request(method, path).status_code not in (401, 403), (method, path)
    assert viewer.get("/api/models").status_code == 200
    assert viewer.get("/api/session").json()["role"] == "viewer"


def test_a_revoked_token_is_refused_at_once(http_fleet):
    # made while the server runs, by the CLI on the same database (as `tokens revoke` below)
    out = cli("tokens", "create", "--role", "operator", "--name", "short-lived", "--data-dir", str(http_fleet.data_dir))
    assert out.returncode == 0 and "shown once" in out.stdout and "TOCO_FLEET_TOKEN" in out.stdout
    token = next(line for line in out.stdout.splitlines() if line.startswith("toco_"))
    api = http_fleet.client(token)
    assert api.get("/api/models").status_code == 200
    out = cli("tokens", "revoke", token.split("_")[1], "--data-dir", str(http_fleet.data_dir))
    assert out.returncode == 0 and "revoked" in out.stdout
    assert api.get("/api/models").status_code == 401
    listed = cli("tokens", "list", "--data-dir", str(http_fleet.data_dir), env={"COLUMNS": "200"}).stdout
    # the secret is base64url, so it may hold "_" itself (and start with one): split at the first two only
    _, token_id, secret = token.split("_", 2)
    assert token_id in listed and secret not in listed  # the secret is never shown again


def test_cli_sends_the_token_and_says_what_is_wrong_in_one_line(http_fleet, tmp_path):
    env = {"TOCO_FLEET_URL": http_fleet.url, "TOCO_FLEET_TOKEN_FILE": str(tmp_path / "none")}
    r = cli("models", "list", env={**env, "TOCO_FLEET_TOKEN": ""})
    assert r.returncode == 2 and "needs an API token" in r.stderr and "Traceback" not in r.stderr
    r = cli("models", "list", env={**env, "TOCO_FLEET_TOKEN": "toco_0123456789ab_" + "B" * 43})
    assert r.returncode == 2 and "refused the API token" in r.stderr and "Traceback" not in r.stderr
    token_file = tmp_path / "token"
    token_file.write_text(http_fleet.tokens["viewer"] + "\n")
    token_file.chmod(0o600)
    r = cli("models", "list", env={**env, "TOCO_FLEET_TOKEN": "", "TOCO_FLEET_TOKEN_FILE": str(token_file)})
    assert r.returncode == 0, r.stderr
    r = cli("rollback", "d-nope", env={**env, "TOCO_FLEET_TOKEN": http_fleet.tokens["viewer"]})
    assert r.returncode == 2 and "403" in r.stderr and "role viewer" in r.stderr


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.1.2.3"])
def test_a_foreign_host_header_is_refused(http_fleet, host):
    api = http_fleet.client(http_fleet.tokens["admin"])
    r = api.get("/api/models", headers={"Host": host})
    assert r.status_code == 400 and "Invalid host" in r.text
    assert api.get("/api/health", headers={"Host": host}).status_code == 400  # DNS rebinding reads nothing
    assert api.get("/api/models", headers={"Host": "fleet.plant.test"}).status_code == 200  # --trusted-host
    assert api.get("/api/models", headers={"Host": f"localhost:{http_fleet.port}"}).status_code == 200


def log_in(http_fleet, role: str) -> httpx.Client:
    """A client holding a dashboard session (cookies from POST /login), no bearer token."""
    c = httpx.Client(base_url=http_fleet.url, timeout=30)
    r = c.post("/login", data={"token": http_fleet.tokens[role], "next": "/devices/x"})
    assert r.status_code == 303 and r.headers["location"] == "/devices/x"
    cookies = r.headers.get_list("set-cookie")
    session = next(h for h in cookies if h.startswith("toco_session="))
    assert "HttpOnly" in session and "SameSite=strict" in session.replace("Strict", "strict")
    return c


def test_login_refuses_bad_tokens_and_foreign_pages(http_fleet):
    c = httpx.Client(base_url=http_fleet.url, timeout=30)
    r = c.post("/login", data={"token": "toco_nope"})
    assert r.status_code == 401 and "unknown or revoked" in r.text and "toco_session" not in c.cookies
    r = c.post("/login", data={"token": http_fleet.tokens["admin"]}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "toco_session" not in c.cookies
    r = c.post("/login", data={"token": http_fleet.tokens["admin"], "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/"  # never an open redirect


def test_cookie_writes_need_the_csrf_token_and_this_origin(http_fleet, lenet_upload):
    c = log_in(http_fleet, "operator")
    assert c.get("/api/models").status_code == 200 and c.get("/api/session").json()["role"] == "operator"
    csrf = c.cookies["toco_csrf"]
    # a bodyless rollback POST, as a cross-site form or <img> would make it: refused before the route runs
    r = c.post("/api/deployments/d-nope/rollback")
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    # a cross-site multipart POST (a form on another site), even with a guessed header
    r = c.post("/api/models", files=lenet_upload, data={"name": "forged"},
               headers={"Origin": "http://evil.example", "X-CSRF-Token": csrf})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = c.post("/api/models", files=lenet_upload, data={"name": "forged"}, headers={"X-CSRF-Token": "guess"})
    assert r.status_code == 403
    assert "forged" not in {m["name"] for m in c.get("/api/models").json()}
    # the dashboard's own request: the header from the readable cookie, this origin
    r = c.post("/api/deployments/d-nope/rollback", headers={"X-CSRF-Token": csrf, "Origin": http_fleet.url})
    assert r.status_code == 404 and "d-nope" in r.json()["detail"]
    # a tampered session cookie is no session
    c.cookies.set("toco_session", c.cookies["toco_session"][:-2] + "xx")
    assert c.get("/api/models").status_code == 401


def test_a_viewer_session_cannot_write_even_with_the_csrf_token(http_fleet):
    c = log_in(http_fleet, "viewer")
    r = c.post("/api/deployments/d-nope/rollback", headers={"X-CSRF-Token": c.cookies["toco_csrf"]})
    assert r.status_code == 403 and "role viewer" in r.json()["detail"]
    r = c.post("/logout")
    assert r.status_code == 303 and "toco_session" not in c.cookies
    assert c.get("/api/models").status_code == 401


def test_dashboard_files_need_a_viewer_and_nothing_outside_static_is_served(http_fleet):
    viewer, anon = http_fleet.client(http_fleet.tokens["viewer"]), http_fleet.client(None)
    assert anon.get("/static/js/main.js").status_code == 401
    r = viewer.get("/static/js/main.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"] and r.text
    assert r.headers["cache-control"] == "no-cache"  # revalidated, so an upgrade never mixes old and new scripts
    again = viewer.get("/static/js/main.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert "text/css" in viewer.get("/static/dashboard.css").headers["content-type"]
    # the server's own source and anything above the static folder stay unreachable, however spelled
    for path in ("/static/../api.py", "/static/%2e%2e/api.py", "/static/..%2fapi.py", "/static/js/../../config.py",
                 "/static/nothing.js"):
        assert viewer.get(path).status_code == 404, path
