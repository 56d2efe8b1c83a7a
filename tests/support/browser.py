"""Debian's Chromium, driven by Playwright's sync API: one browser for the whole test session.

Playwright's sync API holds an event loop in the main thread while it runs, so a second
``sync_playwright()`` in the same process fails ("Sync API inside the asyncio loop"): every
browser test shares the session fixture of tests/conftest.py built on ``chromium``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium browser (playwright Browser), closed on exit.

    Raises RuntimeError when /usr/bin/chromium is missing (`apt-get install chromium`).
    """
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium (make system-deps)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        try:
            yield b
        finally:
            b.close()
