"""`run_coturn`: the controller runs its own coturn, and viewers get credentials that it accepts."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from browservm.controller.turn import stun_binding
from tests.controller.conftest import controller_settings, free_port, run_controller


async def test_the_controller_runs_coturn_and_hands_out_its_credentials(tmp_path: Path) -> None:
    port = free_port()
    settings = controller_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        run_coturn=True,
        turn_secret="test-secret-0123456789",
        turn_urls=[f"turn:127.0.0.1:{port}?transport=udp"],
    )
    async with run_controller(settings) as controller:
        assert stun_binding("127.0.0.1", port, timeout_s=2)
        session = (
            await controller.client.post("/v1/sessions", json={"user_id": "t", "provider": "demo"})
        ).json()
        token = parse_qs(urlsplit(session["viewer_url"]).query)["token"][0]
        async with httpx.AsyncClient(base_url=controller.url) as viewer:
            servers = (
                await viewer.get(f"/v1/sessions/{session['id']}/ice-servers", params={"token": token})
            ).json()
        (turn,) = [s for s in servers["ice_servers"] if any(u.startswith("turn:") for u in s["urls"])]
        assert turn["username"].endswith(f":{session['id']}") and turn["credential"]
        await controller.client.post(f"/v1/sessions/{session['id']}/cancel")
    assert not stun_binding("127.0.0.1", port, timeout_s=0.5)  # stopped with the controller
