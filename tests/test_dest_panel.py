"""The inspector's Destinations panel in Debian's chromium: state, pending, dead, and the retry button."""

from __future__ import annotations

import shutil
import time
from typing import Callable

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon
from test_dest_support import Answer, Receiver, running_receiver
from test_inspector import CHROMIUM, LAUNCH_ARGS, browser_needed

receiver = pytest.fixture(running_receiver, name="receiver")


@pytest.mark.browser
@pytest.mark.slow
@browser_needed
def test_panel_shows_dead_letters_and_retries_them(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """A dead letter shows in the panel; its Retry button sends it again and the count returns to 0."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15000)
    receiver.script = lambda n, r: Answer(500) if n == 0 else Answer(204)
    d = make_daemon(DEFAULT_CONFIG + f"""
[[destinations]]
name = "svc"
url = "{receiver.url}"
channels = ["a.>"]
max_attempts = 1
""")
    d.publish("a.x", {"n": 1})
    receiver.wait_for(lambda r: len(r.requests) == 1)
    time.sleep(0.3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(d.url + "/")
            expect(page.locator("#destinations-note")).to_contain_text("API key")
            page.fill("#token", API_KEY)
            page.click("#token-form button[type=submit]")
            row = page.locator('#destinations tr[data-destination="svc"]')
            expect(row.locator("td").nth(1)).to_have_text("active")
            expect(row.locator("td").nth(4)).to_have_text("1")
            row.locator("button.retry").click()
            receiver.wait_for(lambda r: len(r.delivered()) == 1)
            page.click("#destinations-refresh")
            expect(row.locator("td").nth(4)).to_have_text("0")
            assert errors == []
        finally:
            browser.close()
