"""A user signs the demo CLI in through the sandbox's real Chromium; the credentials are sealed, stored,
delivered into the user's CLI VM, and the CLI there reports the signed-in account."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.controller.conftest import Controller

pytestmark = pytest.mark.browser


async def _cdp_page(profile: Path, url_part: str, timeout_s: float = 30) -> str:
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


async def _evaluate(ws_url: str, expression: str) -> Any:
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(
            json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
        )
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == 1:
                return reply["result"]


async def test_demo_login_completes_and_lands_in_the_cli_vm(
    controller: Controller, capfd: pytest.CaptureFixture[str]
) -> None:
    client = controller.client
    cli_vm = await client.post("/v1/users/alice/cli-vm")
    assert cli_vm.status_code == 201, cli_vm.text

    session = (await client.post("/v1/sessions", json={"user_id": "alice", "provider": "demo"})).json()
    waiting = await controller.wait_status(session["id"], "awaiting_user", "failed")
    assert waiting["status"] == "awaiting_user", waiting["reason"]
    assert "/demo/oauth/authorize?" in waiting["login_url"]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1" in waiting["login_url"]

    # The sandbox id is not part of the public API: find the browser's profile on disk.
    sandboxes = controller.settings.state_dir / "sandboxes"
    browser_dirs = [d for d in sandboxes.iterdir() if (d / "run" / "chromium-profile").exists()]
    assert len(browser_dirs) == 1
    page = await _cdp_page(browser_dirs[0] / "run" / "chromium-profile", "/demo/oauth/authorize")
    # The user types into the real form and presses the button.
    await _evaluate(
        page,
        "document.querySelector('#email').value='alice@example.com';"
        "document.querySelector('#password').value='demo';"
        "document.querySelector('button[type=submit]').click(); true",
    )

    done = await controller.wait_status(session["id"], "completed", "failed", timeout_s=60)
    assert done["status"] == "completed", done["reason"]
    assert done["account"].get("email") == "alice@example.com"

    # Stored: what and whose, never the secret.
    creds = (await client.get("/v1/users/alice/credentials")).json()
    assert [c["provider"] for c in creds] == ["demo"]
    assert creds[0]["account"]["email"] == "alice@example.com" and creds[0]["delivered_at"]

    # Delivered: the demo CLI in the user's CLI VM is signed in.
    output, exit_code = [], None
    async with client.stream(
        "POST",
        "/v1/users/alice/cli-vm/exec",
        json={"argv": [sys.executable, "-m", "browservm.guest.providers.demo_cli", "whoami"]},
    ) as stream:
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
    assert exit_code == 0 and "alice@example.com" in "".join(output)

    # The browser sandbox is gone; the CLI VM stays.
    for _ in range(100):
        if not [d for d in sandboxes.iterdir() if (d / "run" / "chromium-profile").exists()]:
            break
        await asyncio.sleep(0.1)
    assert not [d for d in sandboxes.iterdir() if (d / "run" / "chromium-profile").exists()]
    assert (await client.get("/v1/users/alice/cli-vm")).json()["state"] == "assigned"

    # No credential plaintext anywhere but the CLI VM: not in the database, the API, events, or logs.
    delivered = next(sandboxes.glob("*/home/.browservm-demo/credentials.json"))
    tokens = json.loads(delivered.read_text())
    secrets = [v for k, v in _flatten(tokens) if "token" in k and isinstance(v, str) and len(v) >= 16]
    assert secrets, tokens
    events = (await client.get(f"/v1/sessions/{session['id']}/events")).text
    database = b""
    if controller.settings.effective_database_url.startswith("sqlite"):
        database_path = Path(controller.settings.effective_database_url.split(":///", 1)[1])
        database = b"".join(p.read_bytes() for p in database_path.parent.glob(database_path.name + "*"))
    logs = capfd.readouterr()
    for secret in secrets:
        assert secret not in events
        assert secret.encode() not in database
        assert secret not in logs.out and secret not in logs.err
        assert secret not in json.dumps(creds)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}.{k}")]
    return [(prefix, value)]
