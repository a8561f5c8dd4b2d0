"""Slow and greedy clients against a real ``browservm serve``, with raw sockets, as the attacker of issue 11
did: endless headers, trickled heads and bodies, idle connections, a crowd of connections. None needs an
API key; each must be bounded in time and memory, and answered with the uniform error body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets.asyncio.client

from tests.controller.conftest import free_port

BIN = Path(sys.executable).parent / "browservm"
MiB = 2**20
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 2.0
SEND_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    key: str

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / MiB

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def healthy(self) -> bool:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            return (await client.get("/healthz")).status_code == 200


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-"))
    port = free_port()
    env = {
        **os.environ,
        "BROWSERVM_STATE_DIR": str(state_dir),
        "BROWSERVM_PORT": str(port),
        "BROWSERVM_WARM_POOL_SIZE": "0",
        "BROWSERVM_LOG_LEVEL": "warning",
        "BROWSERVM_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "BROWSERVM_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "BROWSERVM_HTTP_KEEP_ALIVE_S": str(KEEP_ALIVE_S),
        "BROWSERVM_HTTP_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
        "BROWSERVM_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    process = subprocess.Popen([str(BIN), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    key = ""
    try:
        while not key:
            line = (await asyncio.to_thread(process.stdout.readline)).decode()
            assert line, "browservm serve exited before printing its API key"
            if line.startswith("Operator API key"):
                key = line.rsplit(":", 1)[1].strip()
        asyncio.get_running_loop().run_in_executor(None, process.stdout.read)
        running = Served(process, port, key)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if await running.healthy():
                    break
            assert time.monotonic() < deadline, "the controller never answered /healthz"
            await asyncio.sleep(0.1)
        yield running
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(state_dir, ignore_errors=True)


async def read_answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict[str, str], Any]:
    """Read one answer up to the server's close: status, headers and JSON body (None if it just closed)."""
    async with asyncio.timeout(timeout_s):
        data = await reader.read()
    if not data:
        return 0, {}, None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


async def send_endless_header(served: Served, size: int) -> int:
    """Send up to ``size`` bytes of a header line that never ends; return how many went out before the
    server cut the connection off."""
    _reader, writer = await served.connect()
    sent = 0
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        chunk = b"a" * (256 * 1024)
        while sent < size:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return sent


async def test_endless_headers_are_cut_off_and_cost_no_memory(served: Served) -> None:
    before = peak = served.rss_mib()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, served.rss_mib())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    sent = await asyncio.gather(*(send_endless_header(served, 20 * MiB) for _ in range(10)))
    sampler.cancel()
    # Cut off after the limit (16 KiB), plus what the kernel's socket buffers took meanwhile.
    assert all(n < 20 * MiB for n in sent), [n // MiB for n in sent]
    # Before the limit, 10 of these added 230-290 MiB to the controller (httptools keeps the whole head).
    assert peak - before < 20, f"the controller grew {peak - before:.0f} MiB"
    assert await served.healthy()


async def test_a_head_over_the_limit_gets_431_with_the_error_body(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 32768 + b"\r\n\r\n")
    status, headers, body = await read_answer(reader, 5)
    writer.close()
    assert status == 431 and headers["connection"] == "close"
    assert body["error"]["code"] == "headers_too_large" and "16384 bytes" in body["error"]["message"]


async def trickle(served: Served, opening: bytes, byte: bytes) -> tuple[float, int, Any]:
    """Send ``opening``, then one byte every 0.2 s until the server answers or closes."""
    reader, writer = await served.connect()
    started = time.monotonic()
    writer.write(opening)
    answer = asyncio.ensure_future(read_answer(reader, 30))
    try:
        while not answer.done():
            with contextlib.suppress(ConnectionError):
                writer.write(byte)
                await writer.drain()
            await asyncio.wait([answer], timeout=0.2)
        status, _headers, body = await answer
        return time.monotonic() - started, status, body
    finally:
        writer.close()


async def test_slow_heads_are_dropped_after_the_header_timeout(served: Served) -> None:
    results = await asyncio.gather(
        *(trickle(served, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X") for _ in range(30))
    )
    for held_s, status, body in results:
        assert status == 408 and body["error"]["code"] == "request_timeout", body
        assert HEADER_TIMEOUT_S * 0.5 < held_s < HEADER_TIMEOUT_S + 2, held_s
    assert await served.healthy()


async def test_a_connection_that_sends_nothing_is_closed_quietly(served: Served) -> None:
    reader, writer = await served.connect()
    started = time.monotonic()
    status, _headers, _body = await read_answer(reader, 10)
    writer.close()
    assert status == 0, "nothing was asked: the server owes no answer"
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 2


async def test_slow_bodies_are_dropped_after_the_body_timeout(served: Served) -> None:
    opening = (
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + served.key.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
    )
    results = await asyncio.gather(*(trickle(served, opening, b" ") for _ in range(10)))
    for held_s, status, body in results:
        assert status == 408 and "body did not arrive" in body["error"]["message"], body
        assert BODY_TIMEOUT_S * 0.5 < held_s < BODY_TIMEOUT_S + 2, held_s


async def test_a_body_the_application_never_reads_is_timed_out_too(served: Served) -> None:
    # No API key, and a route without a body: the 401 comes at once; the body must still end in time.
    reader, writer = await served.connect()
    writer.write(b"POST /v1/sessions/ses_x/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
    started = time.monotonic()
    async with asyncio.timeout(10):
        data = await reader.read()  # the 401, then the close once the body is overdue
    writer.close()
    assert data.startswith(b"HTTP/1.1 401")
    assert time.monotonic() - started < BODY_TIMEOUT_S + 2


async def test_an_idle_kept_alive_connection_is_closed(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    async with asyncio.timeout(KEEP_ALIVE_S + 5):
        while await reader.read(65536):
            pass
    writer.close()
    assert KEEP_ALIVE_S * 0.5 < time.monotonic() - started < KEEP_ALIVE_S + 2


async def test_connections_are_capped_and_idle_ones_make_room(served: Served) -> None:
    # Kept-alive idle connections fill the controller: a newcomer closes the oldest idle one.
    idle = []
    for _ in range(MAX_CONNECTIONS):
        reader, writer = await served.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        idle.append((reader, writer))
    assert await served.healthy(), "a newcomer is served while idle connections fill the controller"
    # Heads in progress are not idle: past the cap, a newcomer is refused at once with a reason.
    pending = []
    for _ in range(MAX_CONNECTIONS):
        reader, writer = await served.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        pending.append((reader, writer))
    reader, writer = await served.connect()
    status, headers, body = await read_answer(reader, 5)
    writer.close()
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error"]["code"] == "too_many_connections"
    for _reader, writer in idle + pending:
        writer.close()


async def test_a_client_that_stops_reading_is_disconnected(served: Served) -> None:
    # Pipelined requests for the OpenAPI document, never read: the answers pile up in the server's send
    # buffer until it gives up on the client, instead of holding them (and the request) for ever.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as client:
        size = len((await client.get("/openapi.json")).content)
    count = 400
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # keep the kernel from taking it all
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    await writer.drain()
    # The server fills its buffer at once; then it waits SEND_TIMEOUT_S for the client to take some.
    await asyncio.sleep(SEND_TIMEOUT_S + 2)
    received = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(30):
            while chunk := await reader.read(65536):
                received += len(chunk)
    writer.close()
    assert received < count * size / 2, f"received {received} of {count * size} bytes: never cut off"
    assert await served.healthy()


async def test_a_viewers_websocket_outlives_the_body_timeout(served: Served) -> None:
    """The upgrade request's "body" never ends in h11's eyes: a WebSocket must not be timed out as one (a
    viewer's signaling and VNC sockets were cut every ``http_body_timeout_s``)."""
    headers = {"Authorization": f"Bearer {served.key}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", headers=headers) as client:
        created = (await client.post("/v1/sessions", json={"user_id": "ws", "provider": "demo"})).json()
        async with asyncio.timeout(120):  # signaling opens once the sandbox is up
            while (await client.get(f"/v1/sessions/{created['id']}")).json()["status"] != "awaiting_user":
                await asyncio.sleep(0.2)
        token = (await client.post(f"/v1/sessions/{created['id']}/viewer-token")).json()["token"]
        url = f"ws://127.0.0.1:{served.port}/v1/sessions/{created['id']}/signal?token={token}"
        try:
            async with websockets.asyncio.client.connect(url, ping_interval=None) as ws:
                await asyncio.sleep(BODY_TIMEOUT_S * 3)
                pong = await ws.ping()
                async with asyncio.timeout(5):
                    await pong
        finally:
            await client.post(f"/v1/sessions/{created['id']}/cancel")
