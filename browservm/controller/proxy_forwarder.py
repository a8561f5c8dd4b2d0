"""A CLI VM's way to its user's proxy without the proxy's password: a listener on the sandbox network's
gateway, one per CLI VM, that relays each connection to the VM's current exit and adds the
``Proxy-Authorization`` the upstream asks for (docs/egress.md).

Why not the credentials in the VM's ``HTTPS_PROXY``: the user runs any command in their CLI VM, and
the pool's password is the operator's, shared by every user of the pool (with a ``{sticky}`` or
``{user}`` username it would pick anyone's exit, from anywhere). The VM's grant is this listener's
port only; the listener leaves through the exit it is told, so a rotation takes effect at the next
connection without touching the VM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl

import structlog

from browservm.controller.egress import Exit

log = structlog.get_logger(__name__)

HEAD_LIMIT = 64 * 1024
RELAY_CHUNK = 64 * 1024
HEAD_TIMEOUT_S = 30.0
"""A connection that sends no whole request head by then is closed (it holds a task of the controller)."""
CONNECTIONS_PER_VM = 128
"""Open connections one CLI VM may hold through its forwarder; more are answered 503."""
_DROP = (b"proxy-authorization:", b"proxy-connection:", b"connection:", b"keep-alive:")


class ForwarderError(Exception):
    """A request the forwarder cannot relay (no head, a head too long)."""


def rewrite_head(head: bytes, authorization: str) -> bytes:
    """The client's request head with the upstream's credentials, and for a plain request (not CONNECT)
    one request per connection (later ones on a kept-alive connection would go without them)."""
    lines = head.split(b"\r\n")
    request, headers = lines[0], [line for line in lines[1:] if line]
    tunnel = request.upper().startswith(b"CONNECT ")
    # A tunnel's own headers are the client's business; only its credentials are ours.
    dropped = _DROP[:1] if tunnel else _DROP
    kept = [line for line in headers if not line.lower().startswith(dropped)]
    kept.append(b"Proxy-Authorization: " + authorization.encode())
    if not tunnel:
        kept.append(b"Connection: close")
    return b"\r\n".join([request, *kept]) + b"\r\n\r\n"


class ProxyForwarder:
    """The listeners of this controller's CLI VMs, by sandbox id."""

    def __init__(self, listen: ipaddress.IPv4Address, *, connect_timeout_s: float) -> None:
        self.listen = listen
        self.connect_timeout_s = connect_timeout_s
        self._servers: dict[str, asyncio.Server] = {}
        self._exits: dict[str, Exit] = {}
        self._open: dict[str, int] = {}

    def port_of(self, sandbox_id: str) -> int | None:
        server = self._servers.get(sandbox_id)
        return None if server is None else int(server.sockets[0].getsockname()[1])

    async def ensure(self, sandbox_id: str, exit_: Exit) -> int:
        """The VM's listener (started now if it has none), leaving through ``exit_`` from now on."""
        self._exits[sandbox_id] = exit_
        port = self.port_of(sandbox_id)
        if port is not None:
            return port
        server = await asyncio.start_server(
            lambda r, w: self._serve(sandbox_id, r, w), host=str(self.listen), port=0
        )
        self._servers[sandbox_id] = server
        port = int(server.sockets[0].getsockname()[1])
        log.info("proxy_forwarder.listening", sandbox_id=sandbox_id, port=port, exit=exit_.label)
        return port

    async def close(self, sandbox_id: str) -> None:
        self._exits.pop(sandbox_id, None)
        server = self._servers.pop(sandbox_id, None)
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def close_all(self) -> None:
        for sandbox_id in list(self._servers):
            await self.close(sandbox_id)

    async def _serve(
        self, sandbox_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        exit_ = self._exits.get(sandbox_id)
        upstream: asyncio.StreamWriter | None = None
        self._open[sandbox_id] = self._open.get(sandbox_id, 0) + 1
        try:
            if exit_ is None:
                return
            if self._open[sandbox_id] > CONNECTIONS_PER_VM:
                writer.write(
                    b"HTTP/1.1 503 Too Many Connections\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await _read_head(reader)
            credentials = f"{exit_.username or ''}:{exit_.password or ''}".encode()
            authorization = "Basic " + base64.b64encode(credentials).decode()
            secure = ssl.create_default_context() if exit_.pool.scheme == "https" else None
            async with asyncio.timeout(self.connect_timeout_s):
                up_reader, upstream = await asyncio.open_connection(
                    exit_.host, exit_.port, ssl=secure, server_hostname=exit_.host if secure else None
                )
            upstream.write(rewrite_head(head, authorization))
            await upstream.drain()
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, TimeoutError, ForwarderError, asyncio.IncompleteReadError) as exc:
            if exit_ is not None:
                log.info("proxy_forwarder.dropped", sandbox_id=sandbox_id, error=exit_.scrub(str(exc))[:200])
            if upstream is None:
                with contextlib.suppress(OSError):
                    writer.write(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
        finally:
            self._open[sandbox_id] -= 1
            for end in (upstream, writer):
                if end is not None:
                    end.close()
                    with contextlib.suppress(Exception):
                        await end.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ForwarderError("the request head is too long") from exc
    if len(head) > HEAD_LIMIT:
        raise ForwarderError("the request head is too long")
    return head[:-4]


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(RELAY_CHUNK):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()
