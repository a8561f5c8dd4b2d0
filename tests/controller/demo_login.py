"""Signing the demo CLI in the way a user does: typing into the login page of the sandbox's Chromium."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.controller.conftest import Controller
from tests.support.netns import in_netns, netns_of_dir


@dataclass(frozen=True)
class RemotePage:
    """A page of a sandbox's Chromium, reached over its DevTools port inside the sandbox's network."""

    netns: str
    ws_url: str


async def cdp_page(profile: Path, url_part: str, timeout_s: float = 30) -> RemotePage:
    """The sandbox Chromium's page showing ``url_part``."""
    netns = netns_of_dir(profile)

    async def find() -> str | None:
        async with httpx.AsyncClient() as client:
            port_file = profile / "DevToolsActivePort"
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text().split()[0])
                try:
                    targets = (await client.get(f"http://127.0.0.1:{port}/json")).json()
                except httpx.HTTPError:
                    targets = []
                for target in targets:
                    if target.get("type") == "page" and url_part in target.get("url", ""):
                        return str(target["webSocketDebuggerUrl"])
        return None

    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        found = await in_netns(netns, find)
        if found is not None:
            return RemotePage(netns, found)
        await asyncio.sleep(0.2)
    raise AssertionError(f"no page with {url_part!r} in the sandbox's Chromium")


async def evaluate(page: RemotePage, expression: str) -> Any:
    async def run() -> Any:
        async with websockets.connect(page.ws_url, max_size=None) as ws:
            await ws.send(
                json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
            )
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == 1:
                    return reply["result"]

    return await in_netns(page.netns, run)


async def fill_in_login(state_dir: Path, sandbox_id: str, email: str) -> None:
    """Type ``email`` and the demo password into the sign-in page of the sandbox's Chromium, and submit."""
    profile = state_dir / "sandboxes" / sandbox_id / "run" / "chromium-profile"
    page = await cdp_page(profile, "/authorize?")
    await evaluate(
        page,
        f"document.querySelector('#email').value={json.dumps(email)};"
        "document.querySelector('#password').value='demo';"
        "document.querySelector('button[type=submit]').click(); true",
    )


def browser_dirs(controller: Controller) -> list[Path]:
    sandboxes = controller.settings.state_dir / "sandboxes"
    return [d for d in sandboxes.iterdir() if (d / "run" / "chromium-profile").exists()]


async def sign_in(controller: Controller, session_id: str, email: str) -> dict[str, Any]:
    """Wait for the login page, fill it in the sandbox's Chromium, and return the completed session."""
    waiting = await controller.wait_status(session_id, "awaiting_user", "failed")
    assert waiting["status"] == "awaiting_user", waiting["reason"]
    await fill_in_login(controller.settings.state_dir, waiting["sandbox_id"], email)
    done = await controller.wait_status(session_id, "completed", "failed", timeout_s=60)
    assert done["status"] == "completed", done["reason"]
    return done


async def run_in_cli_vm(controller: Controller, user_id: str, argv: list[str]) -> tuple[str, int | None]:
    result = await controller.api.cli_vms.exec(user_id, argv)
    return "".join(chunk.data for chunk in result.output), result.exit_code


WHOAMI = ["python3", "-m", "browservm.guest.providers.demo_cli", "whoami"]
"""Run in a CLI VM: the guest image's Python, which has the demo CLI."""
