"""Signing the demo CLI in the way a user does: typing into the login page of the sandbox's Chromium."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.controller.conftest import Controller


async def cdp_page(profile: Path, url_part: str, timeout_s: float = 30) -> str:
    """The DevTools websocket URL of the sandbox Chromium's page showing ``url_part``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient() as client:
        while asyncio.get_running_loop().time() < deadline:
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
            await asyncio.sleep(0.2)
    raise AssertionError(f"no page with {url_part!r} in the sandbox's Chromium")


async def evaluate(ws_url: str, expression: str) -> Any:
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(
            json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
        )
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == 1:
                return reply["result"]


def browser_dirs(controller: Controller) -> list[Path]:
    sandboxes = controller.settings.state_dir / "sandboxes"
    return [d for d in sandboxes.iterdir() if (d / "run" / "chromium-profile").exists()]


async def sign_in(controller: Controller, session_id: str, email: str) -> dict[str, Any]:
    """Wait for the login page, fill it in the sandbox's Chromium, and return the completed session."""
    waiting = await controller.wait_status(session_id, "awaiting_user", "failed")
    assert waiting["status"] == "awaiting_user", waiting["reason"]
    profile = controller.settings.state_dir / "sandboxes" / waiting["sandbox_id"] / "run" / "chromium-profile"
    page = await cdp_page(profile, "/demo/oauth/authorize")
    await evaluate(
        page,
        f"document.querySelector('#email').value={json.dumps(email)};"
        "document.querySelector('#password').value='demo';"
        "document.querySelector('button[type=submit]').click(); true",
    )
    done = await controller.wait_status(session_id, "completed", "failed", timeout_s=60)
    assert done["status"] == "completed", done["reason"]
    return done


async def run_in_cli_vm(controller: Controller, user_id: str, argv: list[str]) -> tuple[str, int | None]:
    output: list[str] = []
    exit_code = None
    async with controller.client.stream(
        "POST", f"/v1/users/{user_id}/cli-vm/exec", json={"argv": argv}
    ) as stream:
        assert stream.status_code == 200, await stream.aread()
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "output":
                    output.append(data["data"])
                elif event == "exit":
                    exit_code = data["exit_code"]
    return "".join(output), exit_code


WHOAMI = [sys.executable, "-m", "browservm.guest.providers.demo_cli", "whoami"]
