"""A CLI VM's forwarder in front of a real tinyproxy that asks for Basic credentials: what it adds to a
request, what it takes away, and that the upstream lets through only what came through it."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.controller.egress import Exit
from browservm.controller.proxy_forwarder import ProxyForwarder, rewrite_head
from browservm.settings import ProxyPool
from tests.controller.conftest import free_port
from tests.support.tinyproxy import Tinyproxy

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def test_the_head_gets_our_credentials_and_loses_the_clients() -> None:
    plain = rewrite_head(
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive",
        "Basic b3Vyczp5ZXM=",
    )
    assert plain.startswith(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n") and plain.endswith(b"\r\n\r\n")
    assert b"Zm9vOmJhcg==" not in plain and b"keep-alive" not in plain
    assert b"Proxy-Authorization: Basic b3Vyczp5ZXM=\r\n" in plain and b"Connection: close\r\n" in plain
    tunnel = rewrite_head(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nUser-Agent: cli", "Basic b3Vyczp5ZXM=")
    assert b"User-Agent: cli" in tunnel and b"Connection: close" not in tunnel
    assert b"Proxy-Authorization: Basic b3Vyczp5ZXM=" in tunnel


async def _origin(port: int) -> asyncio.Server:
    """The far side: answers every request with ``hello``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port)


async def _ask(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[tuple[Tinyproxy, int, str]]:
    password = secrets.token_urlsafe(12)
    origin_port = free_port()
    origin = await _origin(origin_port)
    proxy = Tinyproxy(
        tmp_path, listen="127.0.0.1", port=free_port(), exit_address="127.0.0.1", users={"u-alice": password}
    )
    async with proxy:
        yield proxy, origin_port, password
    origin.close()


async def test_a_request_through_the_forwarder_carries_the_exits_credentials(
    upstream: tuple[Tinyproxy, int, str],
) -> None:
    proxy, origin_port, password = upstream
    pool = ProxyPool(name="t", host="127.0.0.1", ports=str(proxy.port))
    exit_ = Exit(
        pool=pool,
        assignment_id="a",
        generation=0,
        host="127.0.0.1",
        guest_host="127.0.0.1",
        address=LOOPBACK,
        port=proxy.port,
        username="u-alice",
        password=password,
    )
    request = f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    assert b" 407 " in (await _ask(proxy.port, request)).split(b"\r\n")[0], (
        "tinyproxy let an anonymous through"
    )

    forwarder = ProxyForwarder(LOOPBACK, connect_timeout_s=3)
    try:
        port = await forwarder.ensure("sbx_1", exit_)
        assert await forwarder.ensure("sbx_1", exit_) == port, "one listener per VM"
        answer = await _ask(port, request)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), answer
        # A client's own (wrong) credentials are replaced by the exit's, never passed on.
        forged = request.replace(b"\r\n\r\n", b"\r\nProxy-Authorization: Basic d3Jvbmc6d3Jvbmc=\r\n\r\n")
        assert (await _ask(port, forged)).endswith(b"hello")
        # A tunnel: CONNECT, then the request inside it.
        tunnel = f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode()
        answer = await _ask(port, tunnel + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in answer.split(b"\r\n")[0] and answer.endswith(b"hello"), answer
        assert [s.method for s in proxy.seen()].count("CONNECT") == 1
        # Its upstream gone, a client is told so (502), not left hanging.
        await proxy.stop()
        assert (await _ask(port, request)).startswith(b"HTTP/1.1 502")
    finally:
        await forwarder.close_all()
    assert forwarder.port_of("sbx_1") is None
