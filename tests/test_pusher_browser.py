"""A headless Chromium page using pusher-js (the npm build) against the daemon, with the app's auth endpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

import pusher
import pytest

from tests.conftest import Daemon
from tests.test_inspector import CHROMIUM, LAUNCH_ARGS, browser_needed
from tests.test_pusher_daemon import APP, CONFIG, KEY, SECRET

PUSHER_JS = Path(__file__).parent / "node" / "node_modules" / "pusher-js" / "dist" / "web" / "pusher.min.js"

PAGE = """<!doctype html><html><body><ul id="log"></ul>
<script src="/the-app/pusher.min.js"></script>
<script>
const log = (x) => { const li = document.createElement('li'); li.textContent = JSON.stringify(x);
                     document.getElementById('log').appendChild(li); window.seen.push(x); };
window.seen = [];
const p = new Pusher(%(key)s, {wsHost: '127.0.0.1', wsPort: %(port)d, forceTLS: false, cluster: 'mt1',
                               enabledTransports: ['ws'], disableStats: true,
                               channelAuthorization: {endpoint: '/the-app/pusher/auth', transport: 'ajax'}});
p.connection.bind('connected', () => log({connected: p.connection.socket_id}));
const pub = p.subscribe('news');
pub.bind('pusher:subscription_succeeded', () => log({subscribed: 'news'}));
pub.bind('headline', (d) => log({headline: d}));
const priv = p.subscribe('private-inbox');
priv.bind('pusher:subscription_succeeded', () => log({subscribed: 'private-inbox'}));
priv.bind('mail', (d) => log({mail: d}));
</script></body></html>"""


@pytest.mark.browser
@browser_needed
def test_chromium_page_with_pusher_js(make_daemon: Callable[..., Daemon]) -> None:
    """A browser page on another origin connects with pusher-js, is authorised by its app, receives triggers."""
    from playwright.sync_api import Route, sync_playwright

    d = make_daemon(CONFIG)
    c = pusher.Pusher(app_id=APP, key=KEY, secret=SECRET, host="127.0.0.1", port=d.port, ssl=False)

    def app_server(route: Route) -> None:
        req = route.request
        if req.url.endswith("/pusher.min.js"):
            route.fulfill(body=PUSHER_JS.read_text(), content_type="application/javascript")
        elif req.url.endswith("/pusher/auth"):
            form = {k: v[0] for k, v in parse_qs(req.post_data or "").items()}
            route.fulfill(body=json.dumps(c.authenticate(channel=form["channel_name"], socket_id=form["socket_id"])),
                          content_type="application/json")
        else:
            route.fulfill(body=PAGE % {"key": json.dumps(KEY), "port": d.port}, content_type="text/html")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=[*LAUNCH_ARGS, "--disable-features=LocalNetworkAccessChecks"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # the app's pages, answered by the test as the app's web server would (a page Playwright
            # fulfils has no address, so Chromium's local-network check is switched off above)
            origin = f"{d.url}/the-app"
            page.route(origin + "/**", app_server)
            page.goto(origin + "/")
            page.on("console", lambda m: errors.append("console: " + m.text))
            try:
                page.wait_for_function("window.seen.filter(x => x.subscribed).length === 2", timeout=15000)
            except Exception:
                raise AssertionError(f"{errors} {page.evaluate('window.seen')}") from None
            c.trigger("news", "headline", {"title": "twisted_rt speaks Pusher"})
            c.trigger("private-inbox", "mail", {"from": "ops"})
            page.wait_for_function("window.seen.length >= 5", timeout=15000)
            seen: list[dict[str, Any]] = page.evaluate("window.seen")
            assert {"headline": {"title": "twisted_rt speaks Pusher"}} in seen
            assert {"mail": {"from": "ops"}} in seen
            assert errors == []
        finally:
            browser.close()
