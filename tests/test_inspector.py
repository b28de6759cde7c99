"""
The inspector: its routes in memory (StubTreq), and the page itself in a real
headless Chromium against a real daemon, across a daemon restart.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
from typing import Callable

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.conftest import API_KEY, ARTIFACTS, DEFAULT_CONFIG, JWT_SECRET, Daemon, http
from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import AuthConfig, Config, SourceConfig
from twisted_rt.core.metrics import Stats
from twisted_rt.routes import inspector
from twisted_rt.testing import MemoryBroker
from twisted_rt.web.resource import Root

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]

HOOK_CONFIG = DEFAULT_CONFIG + """
[[sources]]
name = "plain"
verify = "none"
channel = "hooks.{source}"
"""


def stub() -> tuple[StubTreq, App]:
    """A StubTreq over a root with only the inspector mounted, and four events journaled."""
    clock = Clock()
    clock.advance(1795286715.123)  # 2026-11-21T18:45:15.123Z
    broker = MemoryBroker(clock)
    raw = b'{ "a" : 1 }'
    journaled = [
        ("hooks.plain", {"a": 1}, {"id": "d-1", "source": "plain", "type": "push", "raw": raw,
                                   "headers": {"Content-Type": "application/json", "X-Sig": "s"}}),
        ("hooks.plain", {"b": 2}, {"id": "d-2"}),
        # journaled before ingest dropped secret headers (and with odd cases)
        ("hooks.plain", {"a": 1}, {"id": "d-3", "source": "plain", "type": "push", "raw": raw,
                                   "headers": {"Content-Type": "application/json", "authorization": "Bearer k",
                                               "COOKIE": "s=1", "Proxy-Authorization": "Basic x",
                                               "X-Gitlab-Token": "gl", "x-api-key": "k2", "X-Sig": "s"}}),
        ("hooks.other", {}, {"id": "d-4", "source": "gone", "raw": raw,
                             "headers": {"X-Gitlab-Token": "gl", "X-Api-Key": "kept: not this source's rule"}}),
    ]
    for channel, data, fields in journaled:
        broker.commit(channel, data, **fields)
        clock.advance(1)
    config = Config(
        auth=AuthConfig(api_keys=(API_KEY,), jwt_secret=JWT_SECRET),
        sources=(SourceConfig(name="plain", verify="none", redact_headers=("X-Api-Key",)),),
    )
    app = App(config=config, reactor=clock, broker=broker, auth=Authenticator(config.auth), stats=Stats())
    root = Root()
    inspector.mount(root, app)
    return StubTreq(root), app


class RoutesTests(SynchronousTestCase):
    """C{/}, C{/client.js}, C{/static/*} and C{/api/raw/...} in memory."""

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        treq, _ = stub()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = self.successResultOf(treq.get("http://rt.test" + path, headers=headers))
        body = self.successResultOf(resp.content())
        hdrs = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, hdrs, body

    def test_page_served(self) -> None:
        """GET / is the HTML page, with a CSP that allows nothing from elsewhere."""
        code, headers, body = self.get("/")
        self.assertEqual(code, 200)
        self.assertTrue(headers["content-type"].startswith("text/html"))
        self.assertIn(b"/client.js", body)
        self.assertIn("default-src 'self'", headers["content-security-policy"])
        # no external resources in the page
        self.assertNotIn(b"http://", body)
        self.assertNotIn(b"https://", body)

    def test_client_js_and_assets(self) -> None:
        """GET /client.js and the page's assets are served with their types; unknown files are JSON 404s."""
        code, headers, body = self.get("/client.js")
        self.assertEqual(code, 200)
        self.assertTrue(headers["content-type"].startswith("text/javascript"))
        self.assertIn(b"TwistedRT", body)
        code, headers, _ = self.get("/static/inspector.css")
        self.assertEqual((code, headers["content-type"].split(";")[0]), (200, "text/css"))
        code, headers, _ = self.get("/static/inspector.js")
        self.assertEqual(code, 200)
        code, _, body = self.get("/static/nope.js")
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
        code, _, body = self.get("/client.js/extra")
        self.assertEqual(code, 404)

    def test_raw_with_api_key(self) -> None:
        """An API key reads a webhook's original body (base64) and headers."""
        code, _, body = self.get("/api/raw/hooks.plain/1", API_KEY)
        self.assertEqual(code, 200)
        doc = json.loads(body)
        self.assertEqual(base64.b64decode(doc["body_base64"]), b'{ "a" : 1 }')
        self.assertEqual(doc["headers"]["X-Sig"], "s")
        self.assertEqual((doc["channel"], doc["offset"], doc["id"]), ("hooks.plain", 1, "d-1"))

    def test_raw_of_api_event_is_null(self) -> None:
        """An event that did not come as a webhook has null body and headers."""
        code, _, body = self.get("/api/raw/hooks.plain/2", API_KEY)
        self.assertEqual(code, 200)
        doc = json.loads(body)
        self.assertIsNone(doc["body_base64"])
        self.assertIsNone(doc["headers"])

    def test_raw_needs_read_right(self) -> None:
        """Anonymous: 401; a JWT without the channel: 403; a JWT that may subscribe: 200."""
        auth = Authenticator(AuthConfig(jwt_secret=JWT_SECRET))
        code, _, body = self.get("/api/raw/hooks.plain/1")
        self.assertEqual((code, json.loads(body)["error"]), (401, "unauthorized"))
        other = auth.mint("u", subscribe=["other.>"])
        code, _, body = self.get("/api/raw/hooks.plain/1", other)
        self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden"))
        reader = auth.mint("u", subscribe=["hooks.*"])
        code, _, _ = self.get("/api/raw/hooks.plain/1", reader)
        self.assertEqual(code, 200)
        code, _, _ = self.get("/api/raw/hooks.plain/1", "not-a-key")
        self.assertEqual(code, 401)

    def test_raw_never_serves_secret_headers(self) -> None:
        """Rows journaled with secret headers (any case) are served without them and the source's redact_headers."""
        code, _, body = self.get("/api/raw/hooks.plain/3", API_KEY)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["headers"], {"Content-Type": "application/json", "X-Sig": "s"})
        # an event of a source no longer configured: the contract's list still applies
        code, _, body = self.get("/api/raw/hooks.other/1", API_KEY)
        self.assertEqual(json.loads(body)["headers"], {"X-Api-Key": "kept: not this source's rule"})

    def test_raw_bad_requests(self) -> None:
        """Unknown offsets are 404, bad offsets or channels 400, wrong shapes 404."""
        self.assertEqual(self.get("/api/raw/hooks.plain/9", API_KEY)[0], 404)
        self.assertEqual(self.get("/api/raw/hooks.plain/0", API_KEY)[0], 400)
        self.assertEqual(self.get("/api/raw/hooks.plain/x", API_KEY)[0], 400)
        self.assertEqual(self.get("/api/raw/bad%20channel/1", API_KEY)[0], 400)
        self.assertEqual(self.get("/api/raw/hooks.plain", API_KEY)[0], 404)

    def test_raw_offset_is_ascii_digits(self) -> None:
        """The offset follows the one digit rule: Unicode digits and 20-digit numbers are 400, never a 500 or another event."""
        for offset in ("%C2%B2", "%D9%A3", "1" * 20, "+1", "01x"):
            code, _, body = self.get(f"/api/raw/hooks.plain/{offset}", API_KEY)
            self.assertEqual((code, json.loads(body)["error"]), (400, "invalid_offset"), offset)


def test_raw_route_on_real_daemon(make_daemon: Callable[..., Daemon]) -> None:
    """On the daemon, /api/raw sits beside the API routes and returns a webhook's exact bytes."""
    d = make_daemon(HOOK_CONFIG)
    raw = b'{"x":  [1, 2],  "y": "\xc3\xa9"}'
    status, _, _ = http("POST", d.url + "/hooks/plain", raw, {"Content-Type": "application/json", "X-Test": "1"})
    assert status == 202
    status, doc = d.get("/api/raw/hooks.plain/1", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    assert base64.b64decode(doc["body_base64"]) == raw
    assert {k.lower(): v for k, v in doc["headers"].items()}["x-test"] == "1"
    status, _ = d.get("/api/channels", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200  # the API routes are still there


SECRET_CONFIG = DEFAULT_CONFIG + """
[[sources]]
name = "gitlab"
verify = "gitlab"
secrets = ["gl-token-1"]
channel = "gitlab.{header:X-Gitlab-Event}"
redact_headers = ["X-Api-Key"]
"""


def test_raw_route_never_serves_secret_headers(make_daemon: Callable[..., Daemon]) -> None:
    """On the daemon, GitLab's token, credentials and redact_headers are neither journaled nor served by /api/raw."""
    d = make_daemon(SECRET_CONFIG)
    headers = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "gl-token-1",
               "Authorization": "Bearer user-credential", "Cookie": "session=s3", "x-api-key": "k-1",
               "X-Gitlab-Event-UUID": "u-1"}
    status, _, _ = http("POST", d.url + "/hooks/gitlab", b'{"object_kind":"push"}', headers)
    assert status == 202
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, doc = d.get("/api/raw/gitlab.Push_Hook/1", headers=auth)
    assert status == 200
    served = {k.lower(): v for k, v in doc["headers"].items()}
    assert served["x-gitlab-event-uuid"] == "u-1"
    assert not {"x-gitlab-token", "authorization", "cookie", "x-api-key"} & set(served)
    db_path = d.workdir / "var" / "journal.sqlite3"
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        (stored,) = db.execute("SELECT headers FROM events WHERE id = 'u-1'").fetchone()
    assert "gl-token-1" not in stored and "user-credential" not in stored and "k-1" not in stored
    # a row journaled by an older version, secrets and all, is still served without them
    d.stop()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE events SET headers = ? WHERE id = 'u-1'",
                   (json.dumps({**headers, "X-API-KEY": "k-2"}),))
    d.start()
    status, doc = d.get("/api/raw/gitlab.Push_Hook/1", headers=auth)
    assert status == 200
    served = {k.lower(): v for k, v in doc["headers"].items()}
    assert served["x-gitlab-event"] == "Push Hook"
    assert not {"x-gitlab-token", "authorization", "cookie", "x-api-key"} & set(served)


# -- the page in a real browser ---------------------------------------------------


def _chromium_available() -> bool:
    if not os.path.exists(CHROMIUM):
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


browser_needed = pytest.mark.skipif(
    not _chromium_available() and not os.environ.get("CI"), reason="needs /usr/bin/chromium and playwright"
)


@pytest.mark.browser
@pytest.mark.slow
@browser_needed
def test_page_live_tail_survives_restart(make_daemon: Callable[..., Daemon]) -> None:
    """The page lists channels, tails a webhook live, resumes after a daemon restart, and publishes."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15000)  # generous under a loaded CI machine; polls, not a speed check
    d = make_daemon(HOOK_CONFIG)
    # a channel that exists before the page opens
    status, _, _ = http("POST", d.url + "/hooks/plain", b'{"seq": 0}', {"Content-Type": "application/json"})
    assert status == 202
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(d.url + "/")
            expect(page.locator("h1")).to_contain_text("twisted_rt")
            # client.js's pattern matcher agrees with the server's
            assert page.evaluate(
                "[TwistedRT.matches('a.>', 'a.b.c'), TwistedRT.matches('a.*', 'a.b.c'),"
                " TwistedRT.matches('a.*', 'a.b'), TwistedRT.matches('a.>', 'a'), TwistedRT.matches('a.b', 'a.b')]"
            ) == [True, False, True, False, True]
            page.fill("#token", API_KEY)
            page.click("#token-form button[type=submit]")
            # channels with subscriber counts and last offsets
            row = page.locator('#channels tr[data-channel="hooks.plain"]')
            expect(row.locator(".last-offset")).to_have_text("1")

            page.fill("#pattern", "hooks.>")
            page.click("#tail-start")
            expect(page.locator("#status")).to_have_attribute("data-state", "open")
            expect(row.locator(".subscribers")).to_have_text("1", timeout=10000)

            # a webhook posted during the test shows up live, with source and pretty JSON
            status, _, _ = http("POST", d.url + "/hooks/plain", b'{"seq": 1, "who": "live"}',
                                {"Content-Type": "application/json"})
            assert status == 202
            first = page.locator('#events li[data-offset="2"]')
            expect(first).to_be_visible()
            expect(first.locator(".source")).to_have_text("plain")
            expect(first.locator(".json")).to_contain_text('"who": "live"')
            expect(first.locator("time")).not_to_be_empty()

            # restart the daemon (same port, same journal); publish while the page is away
            d.stop()
            expect(page.locator("#status")).not_to_have_attribute("data-state", "open")
            d.start()
            for seq in (2, 3):
                status, _, _ = http("POST", d.url + "/hooks/plain", json.dumps({"seq": seq}).encode(),
                                    {"Content-Type": "application/json"})
                assert status == 202
            expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=20000)
            expect(page.locator('#events li[data-offset="4"] .json')).to_contain_text('"seq": 3', timeout=20000)
            expect(page.locator('#events li[data-offset="3"] .json')).to_contain_text('"seq": 2')
            offsets = page.locator("#events li").evaluate_all("els => els.map(e => +e.dataset.offset)")
            assert offsets == [4, 3, 2]  # newest first, no gap, no duplicate

            # send a test event from the page; it arrives in the tail
            page.fill("#publish-channel", "hooks.page")
            page.fill("#publish-data", '{"from": "the page"}')
            page.click("#publish-form button[type=submit]")
            expect(page.locator("#publish-result")).to_contain_text("accepted")
            expect(page.locator('#events li[data-channel="hooks.page"] .json')).to_contain_text("the page")

            # history of the channel
            row.locator("button", has_text="history").click()
            expect(page.locator("#history li")).to_have_count(4)
            expect(page.locator("#history li").first).to_have_attribute("data-offset", "4")

            page.screenshot(path=str(ARTIFACTS / "inspector.png"), full_page=True)

            # the token and pattern were kept in localStorage: a reload tails again by itself
            page.reload()
            expect(page.locator("#token")).to_have_value(API_KEY)
            expect(page.locator("#pattern")).to_have_value("hooks.>")
            expect(page.locator("#status")).to_have_attribute("data-state", "open")
            assert not errors, errors

            # usable on a phone: no horizontal scrolling at 390px
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.add_init_script(f"localStorage.setItem('twisted_rt.token', '{API_KEY}')")
            phone.goto(d.url + "/?pattern=hooks.plain")
            expect(phone.locator("#status")).to_have_attribute("data-state", "open")
            http("POST", d.url + "/hooks/plain", b'{"seq": 4, "on": "a phone"}', {"Content-Type": "application/json"})
            expect(phone.locator('#events li[data-offset="5"]')).to_be_visible()
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, width
            phone.screenshot(path=str(ARTIFACTS / "inspector-phone.png"), full_page=True)
        finally:
            browser.close()
    assert re.search(r"GET /client\.js 200", d.log())
