"""The inspector page: presence members live; without a token it calls nothing that needs one."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from conftest import API_KEY, Daemon
from test_inspector import CHROMIUM, LAUNCH_ARGS, browser_needed
from test_presence_e2e import CONFIG, Client, token


@pytest.mark.browser
@browser_needed
def test_page_without_token_calls_nothing_that_needs_one_and_shows_members(
        make_daemon: Callable[..., Daemon]) -> None:
    """Opened with no token the page makes no 401 request and says what a token shows; with one it lists members live."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15000)
    d = make_daemon(CONFIG)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            failed: list[str] = []
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            # (the browser's own favicon.ico request is a 404 it logs: not the page's doing)
            page.on("console", lambda m: failed.append(m.text)
                    if m.type == "error" and "404" not in m.text else None)
            page.goto(d.url + "/")
            expect(page.locator("#channels-note")).to_contain_text("With an API key or a token")
            page.wait_for_timeout(300)  # let any request the page would make happen
            assert failed == []

            page.fill("#token", API_KEY)
            page.click("#token-form button[type=submit]")
            alice = Client(d, token("alice", info={"name": "Alice"}))
            alice.subscribe("room.7")
            page.fill("#pattern", "room.7")
            page.click("#tail-start")
            expect(page.locator('#presence li[data-user="alice"]')).to_contain_text("Alice")
            bob = Client(d, token("bob"))
            bob.subscribe("room.7")
            expect(page.locator('#presence li[data-user="bob"]')).to_be_visible()
            expect(page.locator("#presence-count")).to_have_text("2 members")
            alice.close()
            expect(page.locator('#presence li[data-user="alice"]')).to_have_count(0)
            expect(page.locator('#channels tr[data-channel="room.7"] .members')).to_have_text("1", timeout=20000)
            bob.close()
            assert failed == []
        finally:
            browser.close()
