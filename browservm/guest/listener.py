"""Where the controller reaches the agent: the listening end of the channel.

A unix socket (the ``process`` backend), a virtio-serial port (QEMU, :mod:`browservm.guest.serial`) or a
vsock listener (Firecracker, :mod:`browservm.guest.vsock`). The VM's init passes the address it was given
on the kernel command line (``browservm.listen=``) as ``--listen``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ChannelListener(abc.ABC):
    """Where the controller reaches the agent: unix, serial or vsock."""

    @abc.abstractmethod
    async def start(self, on_connection: ConnectionHandler) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class UnixListener(ChannelListener):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.Server | None = None

    async def start(self, on_connection: ConnectionHandler) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket file left by an agent that was killed
        self._server = await asyncio.start_unix_server(on_connection, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def listener_for(address: str) -> ChannelListener:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        return UnixListener(Path(rest))
    try:
        if scheme == "serial":
            from browservm.guest.serial import SerialListener

            return SerialListener.from_address(address)
        if scheme == "vsock":
            from browservm.guest.vsock import VsockListener

            return VsockListener.from_address(address)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    raise SystemExit(
        f"--listen {address}: expected unix:/path/agent.sock, serial:/dev/virtio-ports/NAME or vsock:PORT"
    )
