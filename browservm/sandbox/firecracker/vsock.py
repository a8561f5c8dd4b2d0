"""The host end of a Firecracker vsock connection.

Firecracker bridges the guest's AF_VSOCK sockets to a unix socket on the host (the vsock device's
``uds_path``). To reach a guest port, the host connects to that unix socket and writes
``CONNECT <port>\\n``; Firecracker forwards the connection to the guest and, once the guest accepted,
answers ``OK <host-side port>\\n`` (the port number it assigned to the host end, e.g. ``OK 1073741824``).
If nothing listens on that guest port, Firecracker closes the connection without a word. From then on the
stream is the guest's: the bytes after the ``OK`` line are already the guest's (the agent speaks first).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

RETRY_S = 0.02
_OK = re.compile(rb"OK (\d+)\n")
_MAX_LINE = 64


class VsockConnectError(Exception):
    """The guest port could not be reached through Firecracker's vsock socket."""

    def __init__(self, socket: Path, port: int, why: str) -> None:
        super().__init__(f"vsock port {port} through {socket}: {why}")
        self.socket = socket
        self.port = port


class VsockRefused(VsockConnectError):
    """Firecracker closed the connection: nothing listens on the guest port (yet)."""


async def open_vsock(socket: Path, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """One attempt: connect, ask for ``port``, read Firecracker's ``OK``. Returns the stream and host port."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VsockRefused(socket, port, f"the vsock socket does not accept connections ({exc})") from exc
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        writer.close()
        raise VsockRefused(
            socket, port, "Firecracker closed the connection: no listener on the guest port"
        ) from exc
    except asyncio.LimitOverrunError as exc:
        writer.close()
        raise VsockConnectError(socket, port, "no line ending in Firecracker's answer") from exc
    except BaseException:
        writer.close()
        raise
    match = _OK.fullmatch(line[:_MAX_LINE])
    if match is None:
        writer.close()
        raise VsockConnectError(
            socket, port, f"Firecracker answered {line[:_MAX_LINE]!r}, expected 'OK <port>'"
        )
    return reader, writer, int(match.group(1))


async def connect_vsock(
    socket: Path, port: int, *, timeout_s: float, alive: Callable[[], bool] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to guest ``port``, trying again while the guest has not started listening.

    A booting guest's agent listens a few hundred milliseconds to seconds after the VM starts, and a
    refused CONNECT is answered at once, so the attempts repeat every ``RETRY_S`` until ``timeout_s``.
    ``alive``, when given, says whether the VMM still runs: the wait ends at once when it has gone.
    """
    deadline = time.monotonic() + timeout_s
    last: VsockConnectError | None = None
    while True:
        if alive is not None and not alive():
            raise VsockConnectError(socket, port, "the VMM exited")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"vsock port {port} through {socket}: no listener within {timeout_s:.1f}s ({last})"
            )
        try:
            async with asyncio.timeout(remaining):
                reader, writer, _ = await open_vsock(socket, port)
            return reader, writer
        except VsockRefused as exc:
            last = exc
        except TimeoutError:
            continue
        await asyncio.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
