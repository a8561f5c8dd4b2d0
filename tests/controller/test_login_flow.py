"""A user signs the demo CLI in through the sandbox's real Chromium; the credentials are sealed, stored,
delivered into the user's CLI VM, and the CLI there reports the signed-in account."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from browservm_client import Conflict, NotFound
from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import WHOAMI, browser_dirs, run_in_cli_vm, sign_in

pytestmark = pytest.mark.browser


async def test_demo_login_completes_and_lands_in_the_cli_vm(
    controller: Controller, capfd: pytest.CaptureFixture[str]
) -> None:
    api = controller.api
    await api.cli_vms.create("alice")

    session = await api.sessions.create(user_id="alice", provider="demo")
    waiting = await controller.wait_status(session.id, "awaiting_user", "failed")
    assert "/demo/oauth/authorize?" in waiting["login_url"]
    assert "redirect_uri=http%3A%2F%2F127.0.0.1" in waiting["login_url"]
    done = await sign_in(controller, session.id, "alice@example.com")
    assert done["account"].get("email") == "alice@example.com"

    # Stored: what and whose, never the secret.
    creds = await api.credentials.list("alice")
    assert [c.provider for c in creds] == ["demo"]
    assert creds[0].account["email"] == "alice@example.com" and creds[0].delivered_at

    # Delivered: the demo CLI in the user's CLI VM is signed in.
    output, exit_code = await run_in_cli_vm(controller, "alice", WHOAMI)
    assert exit_code == 0 and "alice@example.com" in output

    # The browser sandbox is gone; the CLI VM stays.
    for _ in range(100):
        if not browser_dirs(controller):
            break
        await asyncio.sleep(0.1)
    assert not browser_dirs(controller)
    assert (await api.cli_vms.get("alice")).state == "running"

    # No credential plaintext anywhere but the CLI VM: not in the database, the API, events, or logs.
    sandboxes = controller.settings.state_dir / "sandboxes"
    delivered = next(sandboxes.glob("*/home/.browservm-demo/credentials.json"))
    tokens = json.loads(delivered.read_text())
    secrets = [v for k, v in _flatten(tokens) if "token" in k and isinstance(v, str) and len(v) >= 16]
    assert secrets, tokens
    events = json.dumps([event.data async for event in api.sessions.events(session.id)])
    database = b""
    if controller.settings.effective_database_url.startswith("sqlite"):
        database_path = Path(controller.settings.effective_database_url.split(":///", 1)[1])
        database = b"".join(p.read_bytes() for p in database_path.parent.glob(database_path.name + "*"))
    logs = capfd.readouterr()
    for secret in secrets:
        assert secret not in events
        assert secret.encode() not in database
        assert secret not in logs.out and secret not in logs.err
        assert secret not in json.dumps([c.model_dump(mode="json") for c in creds])


async def test_credentials_wait_for_a_cli_vm_and_survive_hibernation(controller: Controller) -> None:
    api = controller.api
    session = await api.sessions.create(user_id="bob", provider="demo")
    await sign_in(controller, session.id, "bob@example.com")
    (credential,) = await api.credentials.list("bob")
    assert credential.delivered_at is None  # no CLI VM yet

    await api.cli_vms.create("bob")
    with pytest.raises(Conflict):
        await api.cli_vms.create("bob")
    output, exit_code = await run_in_cli_vm(controller, "bob", WHOAMI)
    assert exit_code == 0 and "bob@example.com" in output

    assert (await api.cli_vms.hibernate("bob")).state == "hibernated"
    with pytest.raises(Conflict) as refused:
        await api.cli_vms.exec("bob", WHOAMI)
    assert refused.value.code == "hibernated"

    assert (await api.cli_vms.resume("bob")).state == "running"
    output, exit_code = await run_in_cli_vm(controller, "bob", WHOAMI)
    assert exit_code == 0 and "bob@example.com" in output

    await api.cli_vms.delete("bob")
    with pytest.raises(NotFound):
        await api.cli_vms.get("bob")
    await api.credentials.delete("bob", credential.id)
    assert await api.credentials.list("bob") == []


async def test_a_token_the_cli_refreshed_is_kept_across_hibernation_and_a_new_vm(
    controller: Controller,
) -> None:
    """Refresh tokens work once: the copy in the VM, which the CLI rotated, is the one that counts. A
    resume must not put the older set back, and a VM created later gets the refreshed one."""
    api = controller.api
    await api.cli_vms.create("carol")
    session = await api.sessions.create(user_id="carol", provider="demo")
    await sign_in(controller, session.id, "carol@example.com")
    (signed_in,) = await api.credentials.list("carol")
    refresh = [*WHOAMI, "--refresh"]
    output, exit_code = await run_in_cli_vm(controller, "carol", refresh)
    assert exit_code == 0 and "carol@example.com" in output, output

    await api.cli_vms.hibernate("carol")
    (kept,) = await api.credentials.list("carol")
    assert kept.id != signed_in.id, "the refreshed files were sealed as the new live set"
    await api.cli_vms.resume("carol")
    output, exit_code = await run_in_cli_vm(controller, "carol", refresh)
    assert exit_code == 0 and "carol@example.com" in output, output

    await api.cli_vms.delete("carol")
    await api.cli_vms.create("carol")
    output, exit_code = await run_in_cli_vm(controller, "carol", refresh)
    assert exit_code == 0 and "carol@example.com" in output, output
    (latest,) = await api.credentials.list("carol")
    assert latest.id not in (signed_in.id, kept.id) and latest.account["email"] == "carol@example.com"


async def test_a_session_without_a_sign_in_expires_and_its_sandbox_goes(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url, session_ttl_s=6)
    async with run_controller(settings) as controller:
        session = await controller.api.sessions.create(user_id="c", provider="demo")
        ended = await controller.wait_status(session.id, "expired", "failed", "completed", timeout_s=40)
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
