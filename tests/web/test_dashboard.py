"""The operator's dashboard in a real Chromium against a real controller: paste the API key once, start a
demo session, see it listed with a link to its viewer; the key lives in sessionStorage, never in a URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext

from tests.controller.conftest import Controller, controller_settings, run_controller

pytestmark = pytest.mark.browser


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}")
    async for running in run_controller(settings):
        yield running


async def test_dashboard_starts_and_lists_a_demo_session(
    browser_context: BrowserContext, controller: Controller
) -> None:
    page = await browser_context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(f"{controller.url}/")

    await page.fill("#api-key", "not-a-key")
    await page.click("#key-form button[type=submit]")
    # A locator wait, not wait_for_function: polling a string predicate needs eval, which the page's
    # Content-Security-Policy (script-src 'self') rightly refuses whenever the first check comes too early.
    await page.locator("#key-state", has_text="401").wait_for()
    assert await page.locator("#panel").is_hidden()

    await page.fill("#api-key", controller.key)
    await page.click("#key-form button[type=submit]")
    await page.locator("#panel").wait_for()
    async with page.expect_popup() as popup_info:
        await page.click("#start-demo")
    viewer = await popup_info.value
    assert "/view/ses_" in viewer.url
    await viewer.close()

    row = page.locator("#sessions tr")
    await row.first.wait_for()
    assert await row.count() == 1
    assert await row.first.locator("a", has_text="view").get_attribute("href")
    assert await page.evaluate("sessionStorage.getItem('browservm.apiKey')") == controller.key
    assert not any(controller.key in url for url in requested)

    # Forgetting the key wipes it from the tab.
    await page.click("#forget-key")
    assert await page.evaluate("sessionStorage.getItem('browservm.apiKey')") is None
    sessions = (await controller.client.get("/v1/sessions")).json()["data"]
    for session in sessions:
        await controller.client.post(f"/v1/sessions/{session['id']}/cancel")
