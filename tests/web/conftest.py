"""A real headless Chromium (Debian's, through Playwright) to open the viewer page with."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, async_playwright

from browservm.guest.display import MANDATORY_CHROMIUM_FLAGS

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    *MANDATORY_CHROMIUM_FLAGS,
    # A receiving Chromium on a loopback-only test bed needs both (research/streaming.md).
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]


@contextlib.asynccontextmanager
async def viewer_browser(profile: Path) -> AsyncIterator[BrowserContext]:
    """The user's browser: Debian's Chromium under Playwright, with the flags a loopback test bed needs."""
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 800, "height": 700},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def browser_context() -> AsyncIterator[BrowserContext]:
    profile = Path(tempfile.mkdtemp(prefix="bvm-viewer-profile-"))
    async with viewer_browser(profile) as context:
        yield context
    shutil.rmtree(profile, ignore_errors=True)
