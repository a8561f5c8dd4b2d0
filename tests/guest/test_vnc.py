"""x11vnc behind a password only the agent knows: a local process that connects gets no picture, the
agent's bridge authenticates and greets the viewer with security None."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from browservm.guest.supervisor import ServiceLog, stop_process
from browservm.guest.vnc import RFB_VERSION, VncAuthError, VncBridge, VncService
from tests.guest.desktop_testbed import Xvfb

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def display() -> Iterator[Xvfb]:
    server = Xvfb(640, 480)
    yield server
    server.stop()


async def test_only_the_agent_gets_past_x11vncs_password(display: Xvfb, tmp_path: Path) -> None:
    service = VncService(SimpleNamespace(display=display.display), {"PATH": "/usr/bin:/bin"}, tmp_path)  # type: ignore[arg-type]
    log = ServiceLog(tmp_path / "vnc.log")
    process = await service.start(log)
    try:
        await asyncio.wait_for(service.wait_ready(process), 15)
        assert service.port is not None
        assert not (tmp_path / "vnc.passwd").exists(), "x11vnc deletes the password file once read"

        # Any local process: it may connect, but it is offered VNC authentication only, no None.
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        assert (await reader.readexactly(12)).startswith(b"RFB 003.00")
        writer.write(RFB_VERSION)
        count = (await reader.readexactly(1))[0]
        assert list(await reader.readexactly(count)) == [2]
        writer.close()

        with pytest.raises(VncAuthError, match="password"):
            await VncBridge.open(1, service.port, "not-it")

        bridge = await VncBridge.open(2, service.port, service.password)
        sent: asyncio.Queue[bytes] = asyncio.Queue()

        async def send(stream_id: int, data: bytes) -> None:
            sent.put_nowait(data)

        async def closed(stream_id: int) -> None:
            pass

        async def receive(size: int) -> bytes:
            data = b""
            async with asyncio.timeout(5):
                while len(data) < size:
                    data += await sent.get()
            return data

        bridge.start(send, closed)
        assert await receive(12) == RFB_VERSION
        await bridge.write(RFB_VERSION)
        assert await receive(2) == bytes([1, 1]), "the viewer is offered security None"
        await bridge.write(b"\x01")
        assert await receive(4) == struct.pack(">I", 0)
        await bridge.write(b"\x01")  # ClientInit (shared): x11vnc answers with ServerInit
        width, height = struct.unpack(">HH", (await receive(4))[:4])
        assert (width, height) == (640, 480)
        await bridge.close()
    finally:
        await stop_process(process)
        log.close()
