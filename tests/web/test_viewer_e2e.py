"""The whole stack, as a user meets it: the operator starts a ``demo`` session over the API, the user
opens the viewer link in a real Chromium, sees the guest's sign-in page and signs in through the viewer
(noVNC through the controller's VNC bridge into the process sandbox), and the session completes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page

from tests.controller.conftest import Controller, controller_settings, run_controller

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}")
    async with run_controller(settings) as running:
        yield running


# The sign-in page is a white card (centre) on a #f4f5f7 background (corner); about:blank is all white.
FORM_SHOWN = """(canvas) => {
    const pixel = (x, y) => Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3));
    return pixel(canvas.width / 2, canvas.height / 2).join() === '255,255,255'
        && pixel(5, 5).join() === '244,245,247';
}"""


async def viewer_status(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(
        "() => window.browservmViewer && window.browservmViewer.status"
    )
    return value or {}


async def test_user_signs_in_through_the_vnc_viewer(
    browser_context: BrowserContext, controller: Controller
) -> None:
    created = await controller.api.sessions.create(user_id="viewer-e2e", provider="demo")
    await controller.wait_status(created.id, "awaiting_user", timeout_s=90)

    page = await browser_context.new_page()
    await page.goto(created.viewer_url + "&mode=vnc")
    async with asyncio.timeout(20):
        while (await viewer_status(page)).get("state") != "streaming":
            await asyncio.sleep(0.1)
    canvas = page.locator(".bvm-vnc canvas")
    await canvas.wait_for()
    box = await canvas.bounding_box()
    assert box is not None
    # Wait until the user can see the sign-in form (the session says awaiting_user a little earlier).
    async with asyncio.timeout(20):
        while not await canvas.evaluate(FORM_SHOWN):
            await asyncio.sleep(0.2)

    # Click the page background above the centred form (Chromium starts sequential focus navigation at
    # the click point), then sign in by keyboard: Tab to the email field, Tab to the password, Enter
    # submits. Every click and key crosses the VNC bridge.
    await page.mouse.click(box["x"] + 10, box["y"] + 10)
    await page.keyboard.press("Tab")
    await page.keyboard.type("viewer@example.test")
    await page.keyboard.press("Tab")
    await page.keyboard.type("demo")
    await page.keyboard.press("Enter")

    try:
        done = await controller.wait_status(created.id, "completed", "failed", timeout_s=30)
    except AssertionError:
        await page.screenshot(path="/tmp/bvm-e2e-failure.png")
        raise
    assert done["status"] == "completed", done
    assert done["account"].get("email") == "viewer@example.test"
