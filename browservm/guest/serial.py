"""The agent's channel endpoint inside a QEMU VM: a virtio-serial port (``--listen serial:/dev/virtio-ports/NAME``).

The host end is a unix socket chardev of QEMU's; the controller connects to that socket. A serial port
has no connections of its own, only the host's side being open or not, which the guest kernel reports:
while no controller is connected the port polls ``POLLHUP`` and reads end at once; once one connects
they block until it writes. So a "connection" here is the time between the host opening its end and
closing it again, and the listener waits for the next one after each.

The agent cannot hang up on its own: closing the port in the guest tells QEMU nothing a client of the
socket sees. A connection the agent ends is over once the host closes its end too (the controller does
when it sees no answer), and only then is a new one served.

This module imports only the standard library and :mod:`browservm.guest.listener`'s interface: it
runs with the guest image's own Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
from pathlib import Path

from browservm.guest.listener import ChannelListener, ConnectionHandler

PORT_NAME = "org.browservm.agent"
"""The name QEMU gives the port (``virtserialport,name=...``); the image's init links it under
``/dev/virtio-ports/``."""
DEFAULT_PATH = Path("/dev/virtio-ports") / PORT_NAME
HOST_POLL_S = 0.05
"""How often a port whose host end is closed is looked at again: the kernel wakes nobody when the host
opens it (poll keeps answering POLLHUP until then)."""
OPEN_TIMEOUT_S = 30.0
"""The device may appear a little after the agent starts (module loading, the init's links)."""


class SerialListener(ChannelListener):
    def __init__(self, path: Path = DEFAULT_PATH) -> None:
        self.path = path
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_address(cls, address: str) -> SerialListener:
        scheme, _, rest = address.partition(":")
        if scheme != "serial" or not rest.startswith("/"):
            raise ValueError(f"--listen {address}: expected serial:/dev/virtio-ports/NAME")
        return cls(Path(rest))

    async def start(self, on_connection: ConnectionHandler) -> None:
        self._fd = await self._open()
        self._task = asyncio.create_task(self._serve(self._fd, on_connection), name="serial-listener")

    async def _open(self) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_TIMEOUT_S
        while True:
            try:
                # Opened once for the agent's life: a virtio-serial port takes one opener at a time.
                return os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except FileNotFoundError:
                if loop.time() >= deadline:
                    raise OSError(
                        errno.ENOENT,
                        f"no virtio-serial port {self.path}: does the VM have a virtserialport named "
                        f"{self.path.name}, and did the init link it?",
                    ) from None
                await asyncio.sleep(0.1)

    async def _serve(self, fd: int, on_connection: ConnectionHandler) -> None:
        while True:
            await self._host_open(fd, True)
            reader, writer, read_end = await self._streams(fd)
            try:
                await on_connection(reader, writer)
            finally:
                writer.close()
                read_end.close()
            # Whether the host hung up (the usual end) or the agent ended the connection: serve the
            # next one only once the host end has been closed, so no controller gets a second Hello.
            await self._host_open(fd, False)

    @staticmethod
    async def _host_open(fd: int, wanted: bool) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            events = poller.poll(0)
            hung_up = any(mask & select.POLLHUP for _, mask in events)
            if hung_up != wanted:
                return
            await asyncio.sleep(HOST_POLL_S)

    @staticmethod
    async def _streams(
        fd: int,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.ReadTransport]:
        """Stream ends over duplicates of the port's descriptor (the pipe transports take character
        devices and close what they are given; the port itself stays open)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        read_end = os.fdopen(os.dup(fd), "rb", buffering=0)
        write_end = os.fdopen(os.dup(fd), "wb", buffering=0)
        read_transport, _ = await loop.connect_read_pipe(lambda: protocol, read_end)
        transport, write_protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), write_end
        )
        writer = asyncio.StreamWriter(transport, write_protocol, reader, loop)
        return reader, writer, read_transport

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
