"""A real browser for the UI drills: Debian's Chromium (`make setup`), driven by Playwright.

Playwright never downloads a browser here: it launches /usr/bin/chromium, headless, with
the flags that keep it off the network (this machine's network is closed, and Chromium's
background connections would be refused many at a time). A drill that fails leaves a
screenshot and the page's HTML in tests/.artifacts/ (printed with the failure).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts"


@contextmanager
def browser_page(name: str, *, timeout_ms: int = 60_000) -> Iterator[Any]:
    """A fresh headless Chromium page; on an exception, a screenshot and the HTML named
    after the drill go to tests/.artifacts/ before it is re-raised."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(timeout_ms)
            try:
                yield page
            except BaseException:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                stem = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
                try:
                    page.screenshot(path=f"{stem}.png", full_page=True)
                    Path(f"{stem}.html").write_text(page.content())
                    print(f"\n[browser] {name} failed at {page.url}; screenshot {stem}.png, page {stem}.html")
                except Exception as exc:  # the drill's own failure is what matters
                    print(f"\n[browser] {name}: no screenshot ({exc})")
                raise
        finally:
            browser.close()


def log_in(page: Any, base_url: str, user: str, password: str) -> None:
    """Airflow's login page (the simple auth manager), as a user fills it in."""
    page.goto(base_url)
    page.get_by_label(re.compile("username", re.I)).fill(user)
    page.get_by_label(re.compile("password", re.I)).fill(password)
    page.get_by_role("button", name=re.compile("sign in|log in|login", re.I)).click()
    page.wait_for_url(re.compile(r"^(?!.*login).*$"))
