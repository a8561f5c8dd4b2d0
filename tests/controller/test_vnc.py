"""The VNC bridge: noVNC's WebSocket (subprotocol "binary") reaches a real x11vnc only through the channel,
and only with the session's viewer token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from browservm.controller import viewers
from tests.controller.viewer_testbed import ViewerBed, viewer_bed, vnc_desktop

pytestmark = pytest.mark.browser


@pytest.fixture
def x11vnc_port() -> Iterator[int]:
    with vnc_desktop() as desktop:
        yield desktop.port


@pytest.fixture
async def bed(x11vnc_port: int) -> AsyncIterator[ViewerBed]:
    async with viewer_bed(vnc_port=x11vnc_port) as running:
        yield running


async def test_bridge_speaks_rfb_with_the_binary_subprotocol(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/vnc?token={bed.token}"
    async with websockets.asyncio.client.connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        banner = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(banner, bytes)
        assert banner.startswith(b"RFB 003.")
        # Answer with the same version: the server then offers its security types (None, as -nopw).
        await ws.send(banner[:12])
        security = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(security, bytes)
        assert 1 in security[1:]  # security type 1 = None


async def test_bridge_refuses_a_token_of_another_session(bed: ViewerBed) -> None:
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/vnc?token={bed.token_for('other-session')}"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.asyncio.client.connect(url, subprotocols=["binary"])  # type: ignore[list-item]
    assert refused.value.response.status_code == 403


async def test_bridge_closes_when_the_guest_has_no_vnc() -> None:
    async with viewer_bed(vnc_port=None) as bed:
        url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/vnc?token={bed.token}"
        with pytest.raises((InvalidStatus, ConnectionClosed)):
            async with websockets.asyncio.client.connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
                await asyncio.wait_for(ws.recv(), 5)


async def test_a_session_takes_a_few_vnc_viewers_not_a_crowd(bed: ViewerBed) -> None:
    # Each socket is a stream to the guest's VNC server: a crowd of them is refused, like signaling's.
    url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/vnc?token={bed.token}"
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(viewers.MAX_SOCKETS_PER_SESSION):
            ws = await stack.enter_async_context(
                websockets.asyncio.client.connect(url, subprotocols=["binary"])  # type: ignore[list-item]
            )
            assert (await asyncio.wait_for(ws.recv(), 10)).startswith(b"RFB ")  # type: ignore[union-attr]
        with pytest.raises(InvalidStatus) as refused:
            await websockets.asyncio.client.connect(url, subprotocols=["binary"])  # type: ignore[list-item]
        assert refused.value.response.status_code == 429
        assert b"too_many_viewers" in refused.value.response.body
