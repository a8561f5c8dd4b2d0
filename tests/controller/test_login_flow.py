"""A user signs the demo CLI in through the sandbox's real Chromium; the credentials are sealed, stored,
delivered into the user's CLI VM, and the CLI there reports the signed-in account."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import WHOAMI, browser_dirs, run_in_cli_vm, sign_in

pytestmark = pytest.mark.browser


async def test_demo_login_completes_and_lands_in_the_cli_vm(
    controller: Controller, capfd: pytest.CaptureFixture[str]
) -> None:
    client = controller.client
    cli_vm = await client.post("/v1/users/alice/cli-vm")
    assert cli_vm.status_code == 201, cli_vm.text

    session = (await client.post("/v1/sessions", json={"user_id": "alice", "provider": "demo"})).json()
    waiting = await controller.wait_status(session["id"], "awaiting_user", "failed")
    assert "/demo/oauth/authorize?" in waiting["login_url"]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1" in waiting["login_url"]
    done = await sign_in(controller, session["id"], "alice@example.com")
    assert done["account"].get("email") == "alice@example.com"

    # Stored: what and whose, never the secret.
    creds = (await client.get("/v1/users/alice/credentials")).json()
    assert [c["provider"] for c in creds] == ["demo"]
    assert creds[0]["account"]["email"] == "alice@example.com" and creds[0]["delivered_at"]

    # Delivered: the demo CLI in the user's CLI VM is signed in.
    output, exit_code = await run_in_cli_vm(controller, "alice", WHOAMI)
    assert exit_code == 0 and "alice@example.com" in output

    # The browser sandbox is gone; the CLI VM stays.
    for _ in range(100):
        if not browser_dirs(controller):
            break
        await asyncio.sleep(0.1)
    assert not browser_dirs(controller)
    assert (await client.get("/v1/users/alice/cli-vm")).json()["state"] == "assigned"

    # No credential plaintext anywhere but the CLI VM: not in the database, the API, events, or logs.
    sandboxes = controller.settings.state_dir / "sandboxes"
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


async def test_credentials_wait_for_a_cli_vm_and_survive_hibernation(controller: Controller) -> None:
    client = controller.client
    session = (await client.post("/v1/sessions", json={"user_id": "bob", "provider": "demo"})).json()
    await sign_in(controller, session["id"], "bob@example.com")
    (credential,) = (await client.get("/v1/users/bob/credentials")).json()
    assert credential["delivered_at"] is None  # no CLI VM yet

    assert (await client.post("/v1/users/bob/cli-vm")).status_code == 201
    assert (await client.post("/v1/users/bob/cli-vm")).status_code == 409
    output, exit_code = await run_in_cli_vm(controller, "bob", WHOAMI)
    assert exit_code == 0 and "bob@example.com" in output

    hibernated = await client.post("/v1/users/bob/cli-vm/hibernate")
    assert hibernated.status_code == 200 and hibernated.json()["state"] == "hibernated"
    refused = await client.post("/v1/users/bob/cli-vm/exec", json={"argv": WHOAMI})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "hibernated"

    resumed = await client.post("/v1/users/bob/cli-vm/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "assigned"
    output, exit_code = await run_in_cli_vm(controller, "bob", WHOAMI)
    assert exit_code == 0 and "bob@example.com" in output

    assert (await client.delete("/v1/users/bob/cli-vm")).status_code == 204
    assert (await client.get("/v1/users/bob/cli-vm")).status_code == 404
    assert (await client.delete(f"/v1/users/bob/credentials/{credential['id']}")).status_code == 204
    assert (await client.get("/v1/users/bob/credentials")).json() == []


async def test_a_session_without_a_sign_in_expires_and_its_sandbox_goes(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url, session_ttl_s=6)
    async for controller in run_controller(settings):
        session = (
            await controller.client.post("/v1/sessions", json={"user_id": "c", "provider": "demo"})
        ).json()
        ended = await controller.wait_status(session["id"], "expired", "failed", "completed", timeout_s=40)
        assert ended["status"] == "expired", ended
        for _ in range(100):
            if not browser_dirs(controller):
                break
            await asyncio.sleep(0.1)
        assert not browser_dirs(controller)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}.{k}")]
    return [(prefix, value)]
