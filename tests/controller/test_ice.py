"""GET /v1/sessions/{id}/ice-servers: TURN REST credentials for the viewer of one session only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from browservm.settings import Settings
from tests.controller.viewer_testbed import ViewerBed, viewer_bed


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[ViewerBed]:
    settings = Settings(
        state_dir=tmp_path,
        stun_urls=["stun:127.0.0.1:3478"],
        turn_urls=["turn:127.0.0.1:3478?transport=udp"],
        turn_secret="ice-test-secret",
        turn_ttl_s=600,
    )
    async with viewer_bed(settings) as running:
        yield running


async def test_viewer_gets_stun_and_a_turn_credential_for_its_session(bed: ViewerBed) -> None:
    async with httpx.AsyncClient(base_url=bed.url) as client:
        response = await client.get(f"/v1/sessions/{bed.session_id}/ice-servers?token={bed.token}")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    stun, turn = body["ice_servers"]
    assert stun == {"urls": ["stun:127.0.0.1:3478"]}
    expiry, session = turn["username"].split(":")
    assert session == bed.session_id
    # Never later than the viewer token (which expires with the session), never later than the TTL.
    assert time.time() < int(expiry) <= time.time() + 300
    assert body["expires_at"] == int(expiry)
    digest = hmac.new(b"ice-test-secret", turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(digest).decode()


async def test_bearer_header_works_and_other_sessions_are_refused(bed: ViewerBed) -> None:
    async with httpx.AsyncClient(base_url=bed.url) as client:
        ok = await client.get(
            f"/v1/sessions/{bed.session_id}/ice-servers", headers={"Authorization": f"Bearer {bed.token}"}
        )
        assert ok.status_code == 200
        foreign = await client.get(
            f"/v1/sessions/{bed.session_id}/ice-servers?token={bed.token_for('another')}"
        )
        assert foreign.status_code == 403
        assert foreign.json()["error"]["code"] == "wrong_session"
        missing = await client.get(f"/v1/sessions/{bed.session_id}/ice-servers")
        assert missing.status_code == 401
