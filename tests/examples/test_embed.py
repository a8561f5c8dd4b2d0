"""examples/embed.html in a real Chromium: the viewer of a real session inside an operator's page (another
origin), and the page's reaction to the viewer's session events as CONTRACTS.md defines them."""

from __future__ import annotations

import functools
import http.server
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page

from browservm_client import AsyncClient
from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import sign_in
from tests.web.conftest import viewer_browser

pytestmark = pytest.mark.browser

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
async def controller(tmp_path: Path, database_url: str) -> AsyncIterator[Controller]:
    async with run_controller(controller_settings(tmp_path, database_url, max_sandboxes=1)) as running:
        yield running


@pytest.fixture
async def browser_context() -> AsyncIterator[BrowserContext]:
    profile = Path(tempfile.mkdtemp(prefix="bvm-embed-profile-"))
    async with viewer_browser(profile) as context:
        yield context
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def operator_site() -> Iterator[str]:
    """The operator's own web server: serves examples/ on another loopback port (another origin)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def _emit(page: Page, session_id: str, **detail: object) -> None:
    """An event as the viewer sends it (CONTRACTS.md): a composed, bubbling CustomEvent."""
    await page.evaluate(
        """(detail) => document.getElementById("viewer").dispatchEvent(
            new CustomEvent("browservm-session", {detail, bubbles: true, composed: true}))""",
        {"session_id": session_id, "reason": "", **detail},
    )


async def test_the_operator_page_embeds_the_viewer_and_follows_the_session(
    controller: Controller, operator_site: str, browser_context: BrowserContext
) -> None:
    async with AsyncClient(controller.key, base_url=controller.url) as api:
        session = await api.sessions.create(user_id="embedded", provider="demo")
        page = await browser_context.new_page()
        await page.goto(f"{operator_site}/embed.html#{session.viewer_url}")

        frame_src = page.locator("browservm-viewer iframe")
        await frame_src.wait_for(state="attached")
        src = await frame_src.get_attribute("src")
        assert src and src.startswith(f"{controller.url}/view/{session.id}?token=")

        # The real viewer tells the page as the session moves: the sign-in page is up...
        status = page.locator("#status")
        await page.wait_for_function(
            "() => document.getElementById('status').innerText.includes('Sign in below')", timeout=60_000
        )
        # ...an event of another session changes nothing...
        await _emit(page, "ses_someoneelse", status="completed")
        assert await page.locator("#done").is_hidden()
        assert "Sign in below" in await status.inner_text()
        # ...and once the user has signed in, the page shows its own success.
        await sign_in(controller, session.id, "embedded@example.test")
        await page.locator("#done").wait_for(state="visible", timeout=20_000)
        assert await page.locator("browservm-viewer").is_hidden()


async def test_an_ended_session_says_why(
    controller: Controller, operator_site: str, browser_context: BrowserContext
) -> None:
    async with AsyncClient(controller.key, base_url=controller.url) as api:
        session = await api.sessions.create(user_id="embedded", provider="demo")
        await api.sessions.cancel(session.id)
    page = await browser_context.new_page()
    await page.goto(f"{operator_site}/embed.html#{session.viewer_url}")
    await page.locator("#ended").wait_for(state="visible", timeout=20_000)
    # The viewer's words for the user, not the operator's technical reason.
    assert "cancelled" in (await page.locator("#ended-reason").inner_text()).lower()
