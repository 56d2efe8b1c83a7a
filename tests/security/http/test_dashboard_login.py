"""The dashboard's login in a real Chromium (Debian's, driven by Playwright) against a real `toco-fleet serve`:
the login form, the cookie flags, CSRF on the page's own writes, a forged cross-site form, log-out."""

from __future__ import annotations


def test_login_session_cookie_csrf_and_logout_in_chromium(http_fleet, browser):
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        # no session: the page answers 401 with the login form
        resp = page.goto(http_fleet.url + "/")
        assert resp.status == 401 and page.locator("#token").is_visible()
        page.fill("#token", "toco_0123456789ab_" + "C" * 43)
        page.click("button[type=submit]")
        assert "unknown or revoked" in page.locator(".error").inner_text()
        page.fill("#token", http_fleet.tokens["operator"])
        page.click("button[type=submit]")
        page.wait_for_url(http_fleet.url + "/")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15_000)
        cookies = {c["name"]: c for c in ctx.cookies()}
        session = cookies["toco_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert cookies["toco_csrf"]["sameSite"] == "Strict" and not cookies["toco_csrf"]["httpOnly"]
        assert "toco_session" not in page.evaluate("document.cookie")  # scripts cannot read the session

        # the page's own writes: without the CSRF header refused, with it through to the route (404: no such id)
        status = page.evaluate("""async () => (await fetch('/api/deployments/d-nope/rollback',
                                                         {method: 'POST'})).status""")
        assert status == 403
        status = page.evaluate("""async () => {
            const csrf = document.cookie.split('; ').find(c => c.startsWith('toco_csrf=')).slice(10);
            return (await fetch('/api/deployments/d-nope/rollback',
                                {method: 'POST', headers: {'X-CSRF-Token': csrf}})).status; }""")
        assert status == 404

        # a page on another site posts a form to the http_fleet: SameSite=Strict keeps the cookie home
        target = http_fleet.url + "/api/deployments/d-nope/rollback"
        page.route("http://evil.test/**", lambda route: route.fulfill(content_type="text/html", body=(
            f'<form id="f" method="post" action="{target}"><input name="x" value="1"></form>'
            "<script>document.getElementById('f').submit()</script>")))
        with page.expect_response(target) as forged:
            page.goto("http://evil.test/")
        assert forged.value.status in (401, 403)

        # log out: the session is gone from the browser
        page.goto(http_fleet.url + "/")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15_000)
        page.click("form.logout button")
        page.wait_for_url(http_fleet.url + "/login")
        assert page.goto(http_fleet.url + "/").status == 401
    finally:
        ctx.close()
