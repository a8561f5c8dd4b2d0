"""A real headless Chromium (Debian's, through Playwright) to open the viewer page with, and a page of
another origin to embed it in."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
async def viewer_browser(
    profile: Path, *, phone: bool = False, executable: str = CHROMIUM
) -> AsyncIterator[BrowserContext]:
    """The user's browser: Debian's Chromium under Playwright, with the flags a loopback test bed needs;
    ``phone``: a small touch screen without a mouse, as a phone's browser reports itself; ``executable``:
    another way to start it (a wrapper that runs it in another network namespace)."""
    shape: dict[str, Any] = (
        {
            "viewport": {"width": 390, "height": 640},
            "has_touch": True,
            "is_mobile": True,
            "device_scale_factor": 2,
        }
        if phone
        else {"viewport": {"width": 800, "height": 700}}
    )
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=FLAGS, **shape
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


@pytest.fixture
async def phone_context() -> AsyncIterator[BrowserContext]:
    profile = Path(tempfile.mkdtemp(prefix="bvm-phone-profile-"))
    async with viewer_browser(profile, phone=True) as context:
        yield context
    shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def embedder_site(html: str) -> Iterator[str]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/embedder.html"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
