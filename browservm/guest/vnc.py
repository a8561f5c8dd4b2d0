"""The VNC fallback inside the guest: an x11vnc on the display, and byte bridges to it for the channel.

x11vnc runs in the foreground (its pid is held by the supervisor) on a free loopback port, without a
password: only the agent connects to it, and the controller's VNC bridge authenticates the viewer.
It is ready once that port answers with an ``RFB 003.00x`` banner.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping

from browservm.aio import cancel_and_wait
from browservm.guest.display import XvfbService
from browservm.guest.supervisor import Service, ServiceLog, ServiceNotReady, spawn

POLL_S = 0.05
CHUNK = 64 * 1024


def free_loopback_port() -> int:
    # x11vnc cannot report a port it picked itself in a parseable way; a port just freed by the kernel
    # is taken by it well before anything else on this host asks for one.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def read_banner(port: int, timeout_s: float = 2.0) -> bytes:
    """Connect to an RFB server and return its 12-byte version banner."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        return await asyncio.wait_for(reader.readexactly(12), timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class VncService(Service):
    name = "vnc"
    requires = ("xvfb",)
    ready_timeout_s = 15.0

    def __init__(self, xvfb: XvfbService, env: Mapping[str, str]) -> None:
        self.xvfb = xvfb
        self.env = dict(env)
        self.port: int | None = None
        """The loopback port x11vnc serves RFB on, while it is ready."""
        self._port: int | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        if self.xvfb.display is None:
            raise ServiceNotReady("the display went away before x11vnc could start")
        self._port = free_loopback_port()
        argv = [
            "x11vnc",
            "-display",
            self.xvfb.display,
            "-rfbport",
            str(self._port),
            "-localhost",
            "-nopw",
            "-forever",
            "-shared",
            "-noncache",
            "-quiet",
        ]
        return await spawn(argv, env=self.env, log_to=log_to)

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        assert self._port is not None
        while True:
            try:
                banner = await read_banner(self._port)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                await asyncio.sleep(POLL_S)
                continue
            if not banner.startswith(b"RFB 003.00"):
                raise ServiceNotReady(f"port {self._port} answered {banner!r}, not an RFB banner")
            self.port = self._port
            return

    async def exited(self) -> None:
        self.port = None


class VncBridge:
    """One RFB connection to x11vnc, pumped to and from a channel byte stream."""

    def __init__(self, stream_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stream_id = stream_id
        self._reader = reader
        self._writer = writer
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, stream_id: int, port: int) -> VncBridge:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
        return cls(stream_id, reader, writer)

    def start(
        self, send: Callable[[int, bytes], Awaitable[None]], closed: Callable[[int], Awaitable[None]]
    ) -> None:
        """Pump what x11vnc sends into ``send``; call ``closed`` once x11vnc ends the connection."""
        self._task = asyncio.create_task(self._pump(send, closed), name=f"vnc-stream-{self.stream_id}")

    async def _pump(
        self, send: Callable[[int, bytes], Awaitable[None]], closed: Callable[[int], Awaitable[None]]
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self._reader.read(CHUNK):
                await send(self.stream_id, chunk)
        await closed(self.stream_id)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        await cancel_and_wait([self._task])
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
