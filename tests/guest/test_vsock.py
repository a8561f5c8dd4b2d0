"""The agent's vsock listener.

A real AF_VSOCK connection needs a VM (the guest end) and its VMM (the host end); this machine is
itself a guest with no loopback transport, so a connection to our own listener cannot be made here, and
listening on its vsock device would open a port to the machine's own host. So the serving path is run
on a unix socket handed in where the AF_VSOCK one would be; what differs (the socket's family and
address) is checked on the AF_VSOCK socket itself where the kernel has it, without listening.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from browservm import protocol
from browservm.guest.vsock import DEFAULT_PORT, VsockListener


def test_addresses_are_parsed_and_bad_ones_say_what_is_expected() -> None:
    assert VsockListener.from_address("vsock:1024").port == 1024
    assert VsockListener.from_address("vsock:1024").cid == socket.VMADDR_CID_ANY
    listener = VsockListener.from_address("vsock:3:52")
    assert (listener.cid, listener.port) == (3, 52)
    for bad in ("vsock:", "vsock:abc", "vsock:1:2:3", "unix:/x"):
        with pytest.raises(ValueError, match="expected vsock:PORT"):
            VsockListener.from_address(bad)
    with pytest.raises(ValueError, match="out of range"):
        VsockListener(0)
    assert DEFAULT_PORT == 1024, "the firecracker backend connects to this port"


def test_the_kernel_gives_an_af_vsock_stream_socket() -> None:
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"this kernel has no AF_VSOCK: {exc}")
    with sock:
        assert sock.family == socket.AF_VSOCK
        assert sock.type == socket.SOCK_STREAM


class UnixStandIn(VsockListener):
    """The listener with a listening unix socket where the AF_VSOCK one would be."""

    def __init__(self, path: Path) -> None:
        super().__init__(DEFAULT_PORT)
        self.path = path

    def listening_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen()
        sock.setblocking(False)
        return sock


async def test_each_connection_reaches_the_agent_and_close_stops_listening(tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    listener = UnixStandIn(path)
    greeted: list[bytes] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            protocol.encode_message(protocol.Hello(sandbox_id="sbx_v", role="cli", agent_version="t"))
        )
        await writer.drain()
        greeted.append(await reader.readexactly(4))
        writer.close()

    await listener.start(agent)
    reader, writer = await asyncio.open_unix_connection(str(path))
    frame = await protocol.read_frame(reader)
    assert isinstance(frame, protocol.MessageFrame)
    assert isinstance(protocol.decode_message(frame.payload), protocol.Hello)
    writer.write(b"ping")
    await writer.drain()
    assert await reader.read() == b""
    assert greeted == [b"ping"]
    writer.close()
    await listener.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_unix_connection(str(path))
