"""No secret reaches the controller's log: the controller is served exactly as the README starts it
(``scripts/run.sh``, debug logging, its own coturn), a real Chromium opens the viewer (page, session
stream, ICE servers, signaling WebSocket, VNC WebSocket, a reload, a fresh link), the user signs in,
and then the whole log, the events and every file in the state directory are searched for each
viewer token, the API key, the TURN secret and the TURN credentials handed out."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import BrowserContext, Page

from browservm.settings import Settings
from browservm_client import AsyncClient
from tests.controller.conftest import Controller
from tests.controller.demo_login import sign_in
from tests.support.served import Served, run_sh

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


class Secrets:
    """What must never reach a log: the API key, the TURN secret, and every viewer token and TURN
    credential an answer carries."""

    def __init__(self, served: Served) -> None:
        self.found: set[str] = {served.key, served.env["BROWSERVM_TURN_SECRET"]}

    def keep(self, text: str) -> None:
        self.found.update(re.findall(r"v1\.ses_[A-Za-z0-9]+\.\d+\.[A-Za-z0-9_-]+", text))
        for match in re.finditer(r'"credential":\s*"([^"]+)"', text):
            self.found.add(match.group(1))


@pytest.fixture
def served() -> Iterator[Served]:
    # Debug logging, and DevTools so that the test signs in by typing into the sandbox's page.
    with run_sh(log_level="debug", devtools_debug_port="true") as running:
        yield running


@pytest.fixture
def secrets(served: Served) -> Secrets:
    return Secrets(served)


@pytest.fixture
async def operator(served: Served, secrets: Secrets) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {served.key}"}, timeout=30
    ) as client:

        async def remember(response: httpx.Response) -> None:
            await response.aread()
            secrets.keep(response.text)

        client.event_hooks["response"].append(remember)
        yield client


async def state(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(
        "() => window.browservmViewer ? window.browservmViewer.status : {}"
    )
    return value


async def until_streaming(page: Page, timeout_s: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while (current := await state(page)).get("state") != "streaming":
            await asyncio.sleep(0.1)
    return current


async def test_no_token_or_secret_reaches_the_log(
    served: Served, secrets: Secrets, operator: httpx.AsyncClient, browser_context: BrowserContext
) -> None:
    created = (await operator.post("/v1/sessions", json={"user_id": "logs", "provider": "demo"})).json()
    page = await browser_context.new_page()
    # WebRTC through the controller's own coturn (relay only): the page asks for ICE servers (a TURN
    # credential) and opens the signaling WebSocket with ?token=.
    await page.goto(created["viewer_url"] + "&ice_policy=relay&first_frame_timeout_ms=8000")
    assert (await until_streaming(page))["mode"] == "webrtc"
    await page.reload()  # the token from sessionStorage this time
    await until_streaming(page)
    # A fresh link, on the VNC path: the VNC WebSocket carries ?token= too.
    fresh = (await operator.post(f"/v1/sessions/{created['id']}/viewer-token")).json()
    second = await browser_context.new_page()
    await second.goto(fresh["viewer_url"] + "&mode=vnc")
    assert (await until_streaming(second))["mode"] == "vnc"
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        # What a viewer's ICE request gets (its TURN credential), and a refused token, both logged at most
        # by their path.
        ice = await anonymous.get(
            f"/v1/sessions/{created['id']}/ice-servers", headers={"Authorization": f"Bearer {fresh['token']}"}
        )
        secrets.keep(ice.text)
        assert "credential" in ice.text
        forged = fresh["token"][:-4] + "AAAA"
        secrets.found.add(forged)
        assert (await anonymous.get(f"/view/{created['id']}?token={forged}")).status_code == 401

    controller = Controller(
        url=served.url,
        key=served.key,
        settings=Settings(state_dir=served.state_dir),
        client=operator,
        api=AsyncClient(served.key, base_url=served.url),
    )
    await sign_in(controller, created["id"], "logs@example.test")
    files_while_live = _state_files(served.state_dir)

    async with operator.stream("GET", f"/v1/sessions/{created['id']}/events") as stream:
        events = "".join([line async for line in stream.aiter_lines()])
    assert '"status": "completed"' in events

    log = served.log.read_text(errors="replace")
    assert "WebSocket /v1/sessions/" in log  # uvicorn's lines are there, cleaned
    assert "token=[redacted]" in log
    key_lines = [line for line in log.splitlines() if served.key in line]
    assert key_lines == [f"Operator API key (shown once, keep it): {served.key}"]  # printed once, by design
    viewer_secrets = secrets.found - {served.key}
    assert {created["viewer_url"].split("token=")[1], fresh["token"], forged} <= viewer_secrets
    assert (
        served.env["BROWSERVM_TURN_SECRET"] in viewer_secrets and len(viewer_secrets) >= 4
    )  # and TURN credentials
    for secret in viewer_secrets:
        assert secret not in log, f"{secret[:12]}… is in the controller's log"
        assert secret not in events, f"{secret[:12]}… is in the session's events"
        for path, content in [*files_while_live, *_state_files(served.state_dir)]:
            assert secret.encode() not in content, f"{secret[:12]}… is in {path}"


def _state_files(state_dir: Path) -> list[tuple[Path, bytes]]:
    """Every readable file of the state directory (database, sandbox logs, service logs)."""
    found = []
    for path in state_dir.rglob("*"):
        if path.is_file() and not path.is_symlink() and "chromium-profile" not in path.parts:
            try:
                found.append((path, path.read_bytes()))
            except OSError:
                continue
    return found
