"""The signaling relay (WebSocket) and WHEP: a real aiortc "page" reaches a real aiortc guest through the
controller's routes and the channel, and the HTTP semantics of WHEP hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aioice.ice
import httpx
import pytest
import websockets.asyncio.client
from aiortc import RTCPeerConnection, RTCSessionDescription
from websockets.exceptions import InvalidStatus

from browservm.controller import viewers
from tests.controller.viewer_testbed import ViewerBed, viewer_bed


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1; on this loopback-only test bed it is the only address peers may use.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
async def bed() -> AsyncIterator[ViewerBed]:
    async with viewer_bed() as running:
        yield running


async def page_offer() -> tuple[RTCPeerConnection, Any, asyncio.Event]:
    """A page-like peer: receive-only video plus the "input" data channel, as viewer.js sets it up."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("input", ordered=True)
    got_frame = asyncio.Event()
    readers: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: Any) -> None:
        async def read() -> None:
            await track.recv()
            got_frame.set()

        readers.append(asyncio.ensure_future(read()))

    await pc.setLocalDescription(await pc.createOffer())
    return pc, channel, got_frame


async def receive(ws: Any, kind: str, timeout_s: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message
            assert message["type"] != "error", message


async def test_socket_without_token_is_refused(bed: ViewerBed) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.asyncio.client.connect(f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal")
    assert refused.value.response.status_code == 401


async def test_token_of_another_session_is_refused(bed: ViewerBed) -> None:
    other = bed.token_for("someone-else")
    with pytest.raises(InvalidStatus) as refused:
        await websockets.asyncio.client.connect(
            f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={other}"
        )
    assert refused.value.response.status_code == 403
    assert b"another session" in refused.value.response.body


async def test_page_gets_video_and_input_reaches_the_guest(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={bed.token}"
    pc, input_channel, got_frame = await page_offer()
    try:
        async with websockets.asyncio.client.connect(url) as ws:
            peer_id = (await receive(ws, "hello"))["peer_id"]
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
            answer = await receive(ws, "answer")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            await asyncio.wait_for(got_frame.wait(), 10)

            opened = asyncio.Event()
            if input_channel.readyState == "open":
                opened.set()
            input_channel.on("open", opened.set)
            await asyncio.wait_for(opened.wait(), 10)
            input_channel.send(json.dumps({"t": "down", "x": 10, "y": 20, "button": 0}))
            async with asyncio.timeout(5):
                while not bed.guest.input_messages:
                    await asyncio.sleep(0.02)
            assert json.loads(bed.guest.input_messages[0])["t"] == "down"

            # A trickled candidate reaches the streamer under this page's peer id.
            await ws.send(json.dumps({"type": "candidate", "candidate": None}))
            async with asyncio.timeout(5):
                while not bed.guest.candidates_received:
                    await asyncio.sleep(0.02)

            # An ICE restart is a new offer on the same socket: same peer, a fresh answer.
            restart = RTCPeerConnection()
            restart.addTransceiver("video", direction="recvonly")
            await restart.setLocalDescription(await restart.createOffer())
            await ws.send(json.dumps({"type": "offer", "sdp": restart.localDescription.sdp}))
            assert (await receive(ws, "answer"))["sdp"].startswith("v=0")
            assert list(bed.guest.peers) == [peer_id]
            assert bed.guest.offers == 2
            await restart.close()

            # The streamer losing the peer is told to the page, which then reconnects.
            bed.guest.kill_peer(peer_id)
            closed = await receive(ws, "closed")
            assert "streamer" in closed["reason"]
    finally:
        await pc.close()


async def test_socket_close_ends_the_peer_at_the_guest(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={bed.token}"
    pc, _channel, _ = await page_offer()
    try:
        async with websockets.asyncio.client.connect(url) as ws:
            await receive(ws, "hello")
            await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
            await receive(ws, "answer")
            assert len(bed.guest.peers) == 1
        async with asyncio.timeout(5):
            while bed.guest.peers:
                await asyncio.sleep(0.02)
    finally:
        await pc.close()


async def test_garbage_gets_an_error_and_the_socket_stays(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={bed.token}"
    async with websockets.asyncio.client.connect(url) as ws:
        await receive(ws, "hello")
        await ws.send(json.dumps({"type": "launch-missiles"}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error"
        assert error["code"] == "bad_message"
        await ws.send(json.dumps({"type": "bye"}))


# ---------------------------------------------------------------------------------------------- WHEP


async def test_whep_offer_answer_trickle_and_delete(bed: ViewerBed) -> None:
    auth = {"Authorization": f"Bearer {bed.token}"}
    whep = f"{bed.url}/v1/sessions/{bed.session_id}/whep"
    pc, _channel, got_frame = await page_offer()
    try:
        async with httpx.AsyncClient() as client:
            options = await client.options(whep)
            assert options.status_code == 204
            assert options.headers["accept-post"] == "application/sdp"

            wrong_type = await client.post(
                whep, content=pc.localDescription.sdp, headers={**auth, "Content-Type": "text/plain"}
            )
            assert wrong_type.status_code == 415

            created = await client.post(
                whep, content=pc.localDescription.sdp, headers={**auth, "Content-Type": "application/sdp"}
            )
            assert created.status_code == 201, created.text
            assert created.headers["content-type"] == "application/sdp"
            location = created.headers["location"]
            assert location.startswith(f"/v1/sessions/{bed.session_id}/whep/")
            assert created.headers["etag"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=created.text, type="answer"))
            await asyncio.wait_for(got_frame.wait(), 10)

            resource = f"{bed.url}{location}"
            frag = {**auth, "Content-Type": "application/trickle-ice-sdpfrag"}
            trickled = await client.patch(
                resource, content="a=mid:0\r\na=end-of-candidates\r\n", headers=frag
            )
            assert trickled.status_code == 204
            assert bed.guest.candidates_received == [None]

            wrong_frag = await client.patch(resource, content="a=end-of-candidates\r\n", headers=auth)
            assert wrong_frag.status_code == 415

            restart = await client.patch(
                resource, content="a=ice-ufrag:new1\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n", headers=frag
            )
            assert restart.status_code == 422
            assert restart.json()["error"]["code"] == "ice_restart_unsupported"

            assert (await client.delete(resource, headers=auth)).status_code == 200
            assert not bed.guest.peers
            assert (await client.delete(resource, headers=auth)).status_code == 404
    finally:
        await pc.close()


async def test_whep_refuses_missing_and_foreign_tokens(bed: ViewerBed) -> None:
    whep = f"{bed.url}/v1/sessions/{bed.session_id}/whep"
    sdp = {"Content-Type": "application/sdp"}
    async with httpx.AsyncClient() as client:
        missing = await client.post(whep, content="v=0\r\n", headers=sdp)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "unauthorized"
        foreign = await client.post(
            whep, content="v=0\r\n", headers={**sdp, "Authorization": f"Bearer {bed.token_for('other')}"}
        )
        assert foreign.status_code == 403
        assert foreign.headers["access-control-allow-origin"] == "*"


async def test_a_session_takes_a_few_viewers_not_a_crowd(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={bed.token}"
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(viewers.MAX_SOCKETS_PER_SESSION):
            ws = await stack.enter_async_context(websockets.asyncio.client.connect(url))
            await receive(ws, "hello")
        with pytest.raises(InvalidStatus) as refused:
            await websockets.asyncio.client.connect(url)
        assert refused.value.response.status_code == 429
    # Once they have gone, a new viewer gets in.
    async with asyncio.timeout(5):
        while True:
            try:
                async with websockets.asyncio.client.connect(url) as ws:
                    await receive(ws, "hello")
                    break
            except InvalidStatus:
                await asyncio.sleep(0.05)
