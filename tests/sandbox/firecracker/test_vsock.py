"""The host end of Firecracker's vsock against a unix socket that answers its CONNECT protocol.

The muxer here follows Firecracker's (``vsock/unix/muxer.rs``): it reads ``connect <port>`` (any case),
drops the connection without a word when the port is not listened on or the request is malformed, and
answers ``OK <host-side port>`` (from 2^30 up) once the guest accepted; the guest's bytes may follow in
the same write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.sandbox.firecracker.vsock import VsockConnectError, VsockRefused, connect_vsock, open_vsock


class Muxer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.listening: set[int] = set()
        self.requests: list[bytes] = []
        self.answer: bytes | None = None
        """Replaces Firecracker's ``OK`` line, to play a VMM that answers something else."""
        self._next_port = 1 << 30
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, path=str(self.path))

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readuntil(b"\n")
            self.requests.append(line)
            words = line.split()
            if len(words) != 2 or words[0].lower() != b"connect" or int(words[1]) not in self.listening:
                return
            port = self._next_port
            self._next_port += 1
            # The guest agent speaks first: its hello arrives in the same segment as the OK.
            writer.write((self.answer or f"OK {port}\n".encode()) + b"hello from guest port " + words[1])
            await writer.drain()
            echoed = await reader.read(100)
            writer.write(b"|echo:" + echoed)
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def muxer(short_dir: Path) -> AsyncIterator[Muxer]:
    muxer = Muxer(short_dir / "v.sock")
    await muxer.start()
    yield muxer
    await muxer.close()


async def test_connect_reads_ok_and_keeps_the_guests_first_bytes(muxer: Muxer) -> None:
    muxer.listening.add(1024)
    reader, writer, host_port = await open_vsock(muxer.path, 1024)
    assert host_port == 1 << 30
    assert muxer.requests == [b"CONNECT 1024\n"]
    assert await reader.readexactly(len(b"hello from guest port 1024")) == b"hello from guest port 1024"
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(len(b"|echo:ping")) == b"|echo:ping"
    writer.close()


async def test_a_port_nobody_listens_on_is_refused(muxer: Muxer) -> None:
    with pytest.raises(VsockRefused, match="no listener on the guest port"):
        await open_vsock(muxer.path, 52)


async def test_connect_waits_for_the_guest_to_listen(muxer: Muxer) -> None:
    async def guest_boots() -> None:
        while len(muxer.requests) < 3:  # refused twice while "booting"
            await asyncio.sleep(0.01)
        muxer.listening.add(1024)

    booting = asyncio.create_task(guest_boots())
    reader, writer = await connect_vsock(muxer.path, 1024, timeout_s=10)
    await booting
    assert len(muxer.requests) >= 3
    assert await reader.readexactly(4) == b"hell"
    writer.close()


async def test_connect_gives_up_at_its_deadline(muxer: Muxer) -> None:
    with pytest.raises(TimeoutError, match=r"no listener within 0\.3s"):
        await connect_vsock(muxer.path, 1024, timeout_s=0.3)


async def test_connect_stops_at_once_when_the_vmm_has_gone(muxer: Muxer) -> None:
    with pytest.raises(VsockConnectError, match="the VMM exited"):
        await connect_vsock(muxer.path, 1024, timeout_s=30, alive=lambda: False)


async def test_an_answer_that_is_not_ok_is_an_error_not_a_retry(muxer: Muxer) -> None:
    muxer.listening.add(1024)
    muxer.answer = b"ERR busy\n"
    with pytest.raises(VsockConnectError, match="expected 'OK <port>'") as failed:
        await connect_vsock(muxer.path, 1024, timeout_s=5)
    assert not isinstance(failed.value, VsockRefused)


async def test_no_socket_is_refused(short_dir: Path) -> None:
    with pytest.raises(VsockRefused, match="does not accept connections"):
        await open_vsock(short_dir / "absent.sock", 1024)
