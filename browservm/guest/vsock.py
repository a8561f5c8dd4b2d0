"""The agent's channel endpoint inside a microVM: an AF_VSOCK listener (``--listen vsock:PORT``).

The controller reaches it through the VMM: Firecracker's vsock unix socket and its ``CONNECT <port>``
handshake (see :mod:`browservm.sandbox.firecracker.vsock`), or a host's vhost-vsock. By the time a
connection gets here the handshake is over: the stream is the channel, as a unix socket's would be.

This module imports only the standard library and :mod:`browservm.guest.listener`'s interface: it
runs with the guest image's own Python.
"""

from __future__ import annotations

import asyncio
import socket

from browservm.guest.listener import ChannelListener, ConnectionHandler

DEFAULT_PORT = 1024
"""The port the firecracker backend connects to (``browservm.listen=vsock:1024`` on the kernel command line)."""
BACKLOG = 8


class VsockListener(ChannelListener):
    def __init__(self, port: int = DEFAULT_PORT, cid: int = socket.VMADDR_CID_ANY) -> None:
        if not 0 < port < 2**32 - 1:
            raise ValueError(f"vsock port {port} is out of range (1 to 4294967294)")
        self.port = port
        self.cid = cid
        self._server: asyncio.Server | None = None

    @classmethod
    def from_address(cls, address: str) -> VsockListener:
        """``vsock:PORT`` (any CID of this guest) or ``vsock:CID:PORT``."""
        scheme, _, rest = address.partition(":")
        parts = rest.split(":")
        if scheme != "vsock" or not 1 <= len(parts) <= 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"--listen {address}: expected vsock:PORT or vsock:CID:PORT (e.g. vsock:1024)")
        if len(parts) == 1:
            return cls(int(parts[0]))
        return cls(int(parts[1]), int(parts[0]))

    def listening_socket(self) -> socket.socket:
        """A bound, listening AF_VSOCK socket. Raises OSError with the reason on a guest without vsock."""
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot create an AF_VSOCK socket ({exc.strerror}): the guest kernel needs the vsock and "
                "vmw_vsock_virtio_transport modules and the VM a vsock device",
            ) from exc
        try:
            sock.bind((self.cid, self.port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    async def start(self, on_connection: ConnectionHandler) -> None:
        self._server = await asyncio.start_server(on_connection, sock=self.listening_socket())

    async def close(self) -> None:
        if self._server is not None:
            # Not wait_closed: from Python 3.12 it also waits for the open connection to end.
            self._server.close()
            self._server = None
