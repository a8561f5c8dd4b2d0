"""TURN REST credentials and the local coturn: a relay-only WebRTC peer connects through a real coturn
with a credential we minted, and does not with a wrong one."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from pydantic import ValidationError

from browservm.controller.turn import (
    Coturn,
    CoturnError,
    free_port,
    ice_servers,
    stun_binding,
    turn_credential,
)
from browservm.settings import Settings

SECRET = "test-turn-secret"


def test_credential_follows_the_turn_rest_scheme() -> None:
    cred = turn_credential(SECRET, "sess1", ttl_s=600, now=1_000_000)
    assert cred.username == "1000600:sess1"
    expected = base64.b64encode(hmac.new(SECRET.encode(), b"1000600:sess1", hashlib.sha1).digest()).decode()
    assert cred.credential == expected
    assert cred.expires_at == 1_000_600


def test_credential_never_outlives_its_session() -> None:
    cred = turn_credential(SECRET, "sess1", ttl_s=3600, not_after=1_000_100.9, now=1_000_000)
    assert cred.username.startswith("1000100:")


def test_empty_secret_is_refused_with_the_variable_to_set() -> None:
    with pytest.raises(ValueError, match="BROWSERVM_TURN_SECRET"):
        turn_credential("", "s", ttl_s=60)


def test_ice_servers_list_stun_and_turn_with_credentials(tmp_path: object) -> None:
    settings = Settings(
        stun_urls=["stun:stun.example.test:3478"],
        turn_urls=["turn:turn.example.test:3478?transport=udp"],
        turn_secret=SECRET,
        turn_ttl_s=120,
    )
    servers = ice_servers(settings, "abc", now=2_000_000)
    assert servers[0].urls == ["stun:stun.example.test:3478"]
    assert servers[0].username is None
    assert servers[1].username == "2000120:abc"
    assert servers[1].credential == turn_credential(SECRET, "abc", ttl_s=120, now=2_000_000).credential
    assert ice_servers(Settings(), "abc") == []


@pytest.fixture
async def coturn() -> AsyncIterator[Coturn]:
    async with Coturn(secret=SECRET, min_port=49400, max_port=49499) as turn:
        yield turn


async def test_coturn_answers_stun_and_stops_cleanly() -> None:
    turn = Coturn(secret=SECRET, min_port=49500, max_port=49520)
    await turn.start()
    assert turn.port is not None
    assert stun_binding("127.0.0.1", turn.port)
    pid = turn.pid
    await turn.stop()
    assert pid is not None
    assert not stun_binding("127.0.0.1", turn.port)


async def test_coturn_needs_only_its_own_port() -> None:
    # coturn's NAT behaviour discovery binds the port above its own; held by someone else, it never started.
    port = free_port("127.0.0.1")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp.bind(("127.0.0.1", port + 1))
        tcp.listen()
        udp.bind(("127.0.0.1", port + 1))
        async with Coturn(
            secret=SECRET, port=port, extra_listening_ips=["127.0.0.2"], min_port=49530, max_port=49540
        ) as turn:
            assert stun_binding("127.0.0.1", port)
            assert turn.port == port


async def test_coturn_reports_why_it_failed_to_start() -> None:
    turn = Coturn(secret=SECRET, binary="browservm-no-such-turnserver")
    with pytest.raises(CoturnError, match="apt-get install coturn"):
        await turn.start()
    await turn.stop()


async def _relay_only_connects(turn: Coturn, username: str, credential: str, *, within_s: float) -> bool:
    """Two aiortc peers that may use relay candidates only: they meet only through coturn."""
    assert turn.port is not None
    config = RTCConfiguration(
        iceServers=[
            RTCIceServer(
                urls=f"turn:127.0.0.1:{turn.port}?transport=udp", username=username, credential=credential
            )
        ],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    offerer, answerer = RTCPeerConnection(config), RTCPeerConnection(config)
    opened = asyncio.Event()
    channel = offerer.createDataChannel("probe")
    channel.on("open", opened.set)
    try:
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        try:
            await asyncio.wait_for(opened.wait(), within_s)
        except TimeoutError:
            return False
        # Only relay candidates were offered, so the open channel went through coturn.
        kinds = {
            line.split()[7] for line in offerer.localDescription.sdp.splitlines() if "candidate:" in line
        }
        assert kinds == {"relay"}, kinds
        return True
    except (ConnectionError, OSError):
        return False
    finally:
        await offerer.close()
        await answerer.close()


async def test_minted_credential_relays_and_wrong_one_does_not(coturn: Coturn) -> None:
    good = turn_credential(SECRET, "sess-ok", ttl_s=300)
    assert await _relay_only_connects(coturn, good.username, good.credential, within_s=10)

    wrong = turn_credential("not-the-secret", "sess-bad", ttl_s=300)
    assert not await _relay_only_connects(coturn, wrong.username, wrong.credential, within_s=3)
    assert "Cannot find credentials" in coturn.log_path.read_text() or "401" in coturn.log_path.read_text()


def test_serve_runs_coturn_where_the_turn_url_points() -> None:
    settings = Settings(turn_urls=["turn:127.0.0.1:3479?transport=udp"], turn_secret=SECRET, run_coturn=True)
    turn = Coturn.from_settings(settings)
    assert (turn.listening_ip, turn.port, turn.allow_loopback_peers) == ("127.0.0.1", 3479, True)
    assert turn.urls[0] == "turn:127.0.0.1:3479?transport=udp"
    # A coturn without a secret is refused as early as the settings.
    with pytest.raises(ValidationError, match="BROWSERVM_TURN_SECRET"):
        Settings(run_coturn=True)
    with pytest.raises(CoturnError, match="BROWSERVM_TURN_SECRET"):
        Coturn.from_settings(Settings.model_construct(run_coturn=True, turn_secret="", turn_urls=[]))
