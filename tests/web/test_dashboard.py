"""The operator's dashboard in a real Chromium against a real controller: paste the API key once, start a
demo session, see it listed with a link to its viewer; the key lives in sessionStorage, never in a URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Locator, Page

from tests.controller.conftest import Controller, controller_settings, run_controller

pytestmark = pytest.mark.browser


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}")
    async with run_controller(settings) as running:
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


async def test_dashboard_follows_sessions_capacity_and_cli_vms_live(
    browser_context: BrowserContext, tmp_path: Path
) -> None:
    settings = controller_settings(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}", max_sandboxes=3, max_queued_sessions=4
    )
    async with run_controller(settings) as controller:
        client = controller.client
        page = await browser_context.new_page()
        await page.goto(f"{controller.url}/")
        await page.fill("#api-key", controller.key)
        await page.click("#key-form button[type=submit]")
        await page.locator("#live", has_text="live").wait_for()

        def row(session_id: str, page: Page = page) -> Locator:
            return page.locator(f"#sessions tr[data-session='{session_id}']")

        # Everything below arrives by the event stream: the page is never reloaded nor refreshed by hand.
        issuer = "ftp://nowhere.invalid/" + "x" * 1500  # one word: nothing to wrap at
        failed = (
            await client.post(
                "/v1/sessions", json={"user_id": "long", "provider": "demo", "options": {"issuer": issuer}}
            )
        ).json()
        await row(failed["id"]).locator(".state", has_text="failed").wait_for()
        reason = row(failed["id"]).locator(".reason")
        assert "nowhere.invalid" in (await reason.get_attribute("title") or "")
        # The long reason is cut to its column: neither the table nor the page got wider than the window.
        widths = await page.evaluate(
            """() => ({table: document.querySelector('.bvm-table').scrollWidth,
                       page: document.documentElement.scrollWidth, window: window.innerWidth})"""
        )
        assert widths["page"] <= widths["window"] and widths["table"] <= widths["window"], widths

        first = (await client.post("/v1/sessions", json={"user_id": "a", "provider": "demo"})).json()
        await row(first["id"]).locator(".state", has_text="awaiting_user").wait_for()
        assert (await client.post("/v1/users/carol/cli-vm")).status_code == 201
        await page.locator("#cli-vms tr[data-user='carol'] .state", has_text="running").wait_for()
        async with client.stream(
            "POST", "/v1/users/carol/cli-vm/exec", json={"argv": ["sh", "-c", "echo hello from the VM"]}
        ) as stream:
            async for _line in stream.aiter_lines():
                pass
        await page.locator("#cli-vms tr[data-user='carol'] button", has_text="output").click()
        await page.locator("#output-runs pre", has_text="hello from the VM").wait_for()
        assert "exit 0" in (await page.locator("#output-runs p").first.text_content() or "")

        # The host fills up: the next session waits in line, shown with its place and in the capacity.
        third = (await client.post("/v1/sessions", json={"user_id": "c", "provider": "demo"})).json()
        await controller.wait_status(third["id"], "starting", "awaiting_user")
        queued = (await client.post("/v1/sessions", json={"user_id": "d", "provider": "demo"})).json()
        await row(queued["id"]).locator(".place", has_text="1").wait_for()
        await page.locator("#capacity-text", has_text="3 of 3 sandboxes in use · 1 waiting").wait_for()

        # Cancelled from the dashboard: the row says so, and the queue is empty again.
        await row(queued["id"]).locator("button", has_text="cancel").click()
        await row(queued["id"]).locator(".state", has_text="cancelled").wait_for()
        await page.locator("#capacity-text", has_text="nobody waiting").wait_for()
        assert (await client.get(f"/v1/sessions/{queued['id']}")).json()["status"] == "cancelled"

        for session in (first, third):
            await client.post(f"/v1/sessions/{session['id']}/cancel")
        await client.delete("/v1/users/carol/cli-vm")
