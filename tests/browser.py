"""A real browser for the run browser's tests: Debian's headless chromium, driven by
Playwright for Python through ``executable_path`` (Playwright's own browser download is never
used). `make test` installs both; the suite fails, rather than skips, where one is missing,
so CI cannot pass without running the browser tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

CHROMIUM = os.environ.get("ASYNCSYNC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "run `make test` once: it installs Debian's chromium and Playwright for Python"


def launch() -> Iterator[Any]:
    """One headless Chromium for the session (yields Playwright's Browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError(f"playwright is not installed; {INSTALL_HINT}") from exc
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"chromium: {CHROMIUM} is missing; {INSTALL_HINT}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()
