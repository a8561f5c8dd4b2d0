"""The VNC fallback inside the guest: an x11vnc on the display, and byte bridges to it for the channel.

x11vnc runs in the foreground (its pid is held by the supervisor) on a free loopback port with a random
password that only the agent knows (handed over in a file x11vnc deletes once read): loopback may be
shared with other sandboxes (the ``process`` backend), and an RFB server without a password would show
and let anyone drive the user's screen. It is ready once that port answers with an ``RFB 003.00x`` banner.

A :class:`VncBridge` answers x11vnc's VNC authentication itself and offers the viewer's side (noVNC,
through the controller's bridge, which checked the viewer token) RFB 3.8 with security type *None*, then
relays bytes both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from browservm.aio import cancel_and_wait
from browservm.guest.display import XvfbService
from browservm.guest.supervisor import Service, ServiceLog, ServiceNotReady, spawn

POLL_S = 0.05
CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT_S = 5.0
RFB_VERSION = b"RFB 003.008\n"
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2


class VncAuthError(Exception):
    """x11vnc refused the bridge (wrong password, or it offers no VNC authentication)."""


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The answer to a VNC authentication challenge: DES over it, keyed by the password (at most 8 bytes,
    zero-padded) with each key byte's bits reversed, as RFB specifies."""
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in password.encode()[:8].ljust(8, b"\0"))
    # DES-ECB is what RFB prescribes here (three equal keys make single DES); it guards loopback only.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(challenge) + encryptor.finalize()


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

    def __init__(self, xvfb: XvfbService, env: Mapping[str, str], run_dir: Path) -> None:
        self.xvfb = xvfb
        self.env = dict(env)
        self.run_dir = run_dir
        self.port: int | None = None
        """The loopback port x11vnc serves RFB on, while it is ready."""
        self.password = secrets.token_urlsafe(6)
        """x11vnc's password (VNC uses 8 characters), new for each sandbox; only the agent's bridges use it."""
        self._port: int | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        if self.xvfb.display is None:
            raise ServiceNotReady("the display went away before x11vnc could start")
        self._port = free_loopback_port()
        password_file = self.run_dir / "vnc.passwd"
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(self.password + "\n")
        # x11vnc takes the screen's size from the X connection, which says what Xvfb was created at
        # (the largest the screen may follow a viewer to): clip to the size it has now; -xrandr then
        # follows each later change (checked with x11vnc 0.9.16).
        width, height = await asyncio.to_thread(_screen_size, self.xvfb.display)
        argv = [
            "x11vnc",
            "-display",
            self.xvfb.display,
            "-clip",
            f"{width}x{height}+0+0",
            "-rfbport",
            str(self._port),
            "-localhost",
            "-passwdfile",
            f"rm:{password_file}",  # x11vnc deletes it once read
            "-forever",
            "-shared",
            "-noncache",
            "-xrandr",  # the screen follows the WebRTC viewer's size: tell VNC viewers (DesktopSize)
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
    """One RFB connection to x11vnc, authenticated by the agent, pumped to and from a channel byte stream."""

    def __init__(self, stream_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stream_id = stream_id
        self._reader = reader
        self._writer = writer
        self._from_viewer = asyncio.StreamReader()
        self._upstream_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, stream_id: int, port: int, password: str) -> VncBridge:
        """Connect to x11vnc and pass its VNC authentication. Raises :class:`VncAuthError` or OSError."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await _authenticate(reader, writer, password)
        except BaseException:
            writer.close()
            raise
        return cls(stream_id, reader, writer)

    def start(
        self, send: Callable[[int, bytes], Awaitable[None]], closed: Callable[[int], Awaitable[None]]
    ) -> None:
        """Greet the viewer, then pump both ways; call ``closed`` once either side ends the connection."""
        self._tasks = [asyncio.create_task(self._run(send, closed), name=f"vnc-stream-{self.stream_id}")]

    async def _run(
        self, send: Callable[[int, bytes], Awaitable[None]], closed: Callable[[int], Awaitable[None]]
    ) -> None:
        upstream = asyncio.create_task(self._to_server(), name=f"vnc-stream-{self.stream_id}-up")
        try:
            with contextlib.suppress(
                ConnectionError, asyncio.IncompleteReadError, TimeoutError, VncAuthError
            ):
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    await self._greet_viewer(send)
                self._upstream_ready.set()  # the viewer's bytes from here on are x11vnc's
                while chunk := await self._reader.read(CHUNK):
                    await send(self.stream_id, chunk)
        finally:
            await cancel_and_wait([upstream])
        await closed(self.stream_id)

    async def _greet_viewer(self, send: Callable[[int, bytes], Awaitable[None]]) -> None:
        """The viewer's side of the handshake: RFB 3.8 (3.3 and 3.7 understood), security *None*."""
        await send(self.stream_id, RFB_VERSION)
        version = await self._from_viewer.readexactly(12)
        if not version.startswith(b"RFB 003.00"):
            raise VncAuthError(f"the viewer sent {version!r}, not an RFB version")
        if version == b"RFB 003.003\n":
            await send(self.stream_id, struct.pack(">I", SECURITY_NONE))  # 3.3: the server decides
            return
        await send(self.stream_id, bytes([1, SECURITY_NONE]))
        chosen = (await self._from_viewer.readexactly(1))[0]
        if chosen != SECURITY_NONE:
            raise VncAuthError(f"the viewer chose security type {chosen}, offered only None")
        if version >= b"RFB 003.008\n":
            await send(self.stream_id, struct.pack(">I", 0))  # SecurityResult: OK

    async def _to_server(self) -> None:
        await self._upstream_ready.wait()
        with contextlib.suppress(ConnectionError):
            while chunk := await self._from_viewer.read(CHUNK):
                self._writer.write(chunk)
                await self._writer.drain()

    async def write(self, data: bytes) -> None:
        """Bytes from the viewer: its side of the handshake first, then everything for x11vnc."""
        self._from_viewer.feed_data(data)

    async def close(self) -> None:
        self._from_viewer.feed_eof()
        await cancel_and_wait(self._tasks)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def _authenticate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str) -> None:
    """The client's side of RFB 3.8's handshake with VNC authentication, up to a successful result."""
    banner = await reader.readexactly(12)
    if not banner.startswith(b"RFB 003.00"):
        raise VncAuthError(f"x11vnc sent {banner!r}, not an RFB banner")
    writer.write(RFB_VERSION)
    count = (await reader.readexactly(1))[0]
    if count == 0:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        raise VncAuthError(f"x11vnc refused the connection: {(await reader.readexactly(length)).decode()}")
    offered = await reader.readexactly(count)
    if SECURITY_VNC_AUTH not in offered:
        raise VncAuthError(f"x11vnc offers security types {list(offered)}, not VNC authentication")
    writer.write(bytes([SECURITY_VNC_AUTH]))
    challenge = await reader.readexactly(16)
    writer.write(vnc_auth_response(password, challenge))
    await writer.drain()
    (result,) = struct.unpack(">I", await reader.readexactly(4))
    if result != 0:
        raise VncAuthError("x11vnc refused the password")


def _screen_size(display: str) -> tuple[int, int]:
    from browservm.guest.screen_size import ScreenSizer

    sizer = ScreenSizer(display)
    try:
        return sizer.size()
    finally:
        sizer.close()
