"""What slow and greedy clients cost a served controller, and what a normal request costs meanwhile.

Starts ``browservm serve`` (the real command, in its own process, SQLite, process backend) on loopback and
attacks it the way issue 11 describes, with raw sockets:

1. ``big headers``: 10 connections each send 20 MiB of one unfinished header line. Reports how much the
   controller's RSS grew (peak) and how many connections the server cut off before the 20 MiB were in.
2. ``slow clients``: 300 connections trickle a request head one byte a second and 10 trickle a body;
   a client the server closes reconnects at once (a persistent attacker). Reports how long the server
   held each one and how many are held past ``--hold-s``.
3. ``event streams``: one session (a real browser sandbox), then ``--streams`` ``GET .../events`` streams
   opened and left idle, while the 300 slow-header clients keep going. Reports the time to open them,
   the controller's RSS per stream, and the latency of a normal authenticated request meanwhile.

The controller's stream and rate limits are raised through the environment so that the figures show
what the streams cost, not the limits refusing them. Not a test: figures depend on the machine.

    .venv/bin/python bench/http_limits.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

HOST = "127.0.0.1"
MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    key: str
    state_dir: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / MiB

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


async def serve(streams: int) -> Served:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-bench-limits-"))
    port = _free_port()
    env = {
        **os.environ,
        "BROWSERVM_STATE_DIR": str(state_dir),
        "BROWSERVM_PORT": str(port),
        "BROWSERVM_WARM_POOL_SIZE": "0",
        "BROWSERVM_LOG_LEVEL": "warning",
        "BROWSERVM_LOG_JSON": "false",
        # Let every stream in: the bench measures what streams cost, not the caps refusing them.
        "BROWSERVM_MAX_EVENT_STREAMS": str(streams + 100),
        "BROWSERVM_MAX_EVENT_STREAMS_PER_KEY": str(streams + 100),
        "BROWSERVM_RATE_LIMIT_PER_S": "10000",
        "BROWSERVM_RATE_LIMIT_BURST": "10000",
        "BROWSERVM_HTTP_MAX_CONNECTIONS": str(streams + 1000),
    }
    command = [str(Path(sys.executable).parent / "browservm"), "serve"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    key = ""
    deadline = time.monotonic() + 60
    while not key and time.monotonic() < deadline:
        line = (await asyncio.to_thread(process.stdout.readline)).decode()
        if not line:
            raise RuntimeError("browservm serve exited before printing its API key")
        if line.startswith("Operator API key"):
            key = line.rsplit(":", 1)[1].strip()
    # Keep its output (errors are worth reading), so that a full pipe never blocks the controller.
    log = state_dir.parent / f"{state_dir.name}.log"

    def keep() -> None:
        assert process.stdout is not None
        with log.open("wb") as out:
            while chunk := process.stdout.read1(65536):
                out.write(chunk)

    asyncio.get_running_loop().run_in_executor(None, keep)
    print(f"controller log: {log}")
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/healthz")).status_code == 200:
                    break
            await asyncio.sleep(0.1)
    return Served(process, port, key, state_dir)


# ---------------------------------------------------------------------------------------------- probes


async def timed_requests(served: Served, count: int, pause_s: float, path: str) -> list[float]:
    """Latency of ``count`` authenticated GETs, each on a fresh connection (as a new client would)."""
    times = []
    headers = {"Authorization": f"Bearer {served.key}"}
    for _ in range(count):
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=60) as client:
            started = time.perf_counter()
            response = await client.get(path)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        await asyncio.sleep(pause_s)
    return times


def latency_line(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return (
        f"{name:<44} median {statistics.median(ms):7.1f} ms   p90 {ms[int(len(ms) * 0.9) - 1]:7.1f} ms"
        f"   max {ms[-1]:7.1f} ms   (n={len(ms)})"
    )


class RssPeak:
    """The controller's peak RSS, sampled every 20 ms while the context runs."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.peak = served.rss_mib()
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.served.rss_mib())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ---------------------------------------------------------------------------------------------- attackers


async def big_header(port: int, size: int) -> bool:
    """Send ``size`` bytes of one header line that never ends; True if the server cut us off first."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        chunk = b"a" * MiB
        for _ in range(size // MiB):
            writer.write(chunk)
            await writer.drain()
        # Everything is sent; give the server a moment to answer or close.
        try:
            async with asyncio.timeout(2):
                await reader.read(1)
        except TimeoutError:
            return False
        return True
    except (ConnectionError, OSError):
        return True
    finally:
        writer.close()


@dataclass
class SlowClients:
    """Clients that trickle one byte a second and reconnect as soon as the server drops them."""

    port: int
    opening: bytes
    trickle: bytes
    count: int
    held_s: list[float] = field(default_factory=list)
    open_since: dict[int, float] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client(n)) for n in range(self.count)]

    async def _client(self, n: int) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            started = time.monotonic()
            self.open_since[n] = started
            try:
                writer.write(self.opening)
                closed = asyncio.ensure_future(reader.read(65536))
                while not closed.done():
                    writer.write(self.trickle)
                    await writer.drain()
                    await asyncio.wait([closed], timeout=1.0)
                while await reader.read(65536):
                    pass  # the rest of the server's answer, up to its close
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
                self.open_since.pop(n, None)
                self.held_s.append(time.monotonic() - started)

    def held_longer_than(self, seconds: float) -> int:
        now = time.monotonic()
        return sum(1 for since in self.open_since.values() if now - since > seconds)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def open_stream(port: int, key: str, session_id: str) -> tuple[int, asyncio.StreamWriter, Any]:
    """Open one SSE stream with a raw socket; return its status and the socket (read in the background)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        f"GET /v1/sessions/{session_id}/events HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])

    async def drain() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(65536):
                pass

    return status, writer, asyncio.create_task(drain())


async def bounded(limit: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(run(job) for job in jobs), return_exceptions=True)


async def cancel(served: Served, session_id: str) -> None:
    """End the session and wait until its browser sandbox is gone (a stopped controller leaves it)."""
    sandboxes = served.state_dir / "sandboxes"
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(
            base_url=served.url, headers={"Authorization": f"Bearer {served.key}"}, timeout=30
        ) as client:
            await client.post(f"/v1/sessions/{session_id}/cancel")
    deadline = time.monotonic() + 30
    while sandboxes.exists() and any(sandboxes.iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------- phases


async def main(args: argparse.Namespace) -> None:
    served = await serve(args.streams)
    print(f"browservm serve on {served.url} (pid {served.process.pid})")
    session_id = ""
    try:
        idle_rss = served.rss_mib()
        print(f"controller RSS idle: {idle_rss:.0f} MiB")
        print(
            latency_line(
                "GET /v1/sessions (nothing else open)", await timed_requests(served, 20, 0.05, "/v1/sessions")
            )
        )

        # 1. big headers
        if "headers" in args.phases:
            before = served.rss_mib()
            async with RssPeak(served) as peak:
                results = await asyncio.gather(*(big_header(served.port, 20 * MiB) for _ in range(10)))
            print(
                f"10 unfinished 20 MiB headers: RSS +{peak.peak - before:.0f} MiB at peak; "
                f"{sum(results)}/10 cut off by the server"
            )

        # 2. slow clients
        heads = SlowClients(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X", 300)
        bodies = SlowClients(
            served.port,
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n",
            b" ",
            10,
        )
        heads.start()
        if "slow" in args.phases:
            bodies.start()
            await asyncio.sleep(2)
            print(
                latency_line(
                    "GET /v1/sessions (300 slow heads, 10 slow bodies)",
                    await timed_requests(served, 20, 0.5, "/v1/sessions"),
                )
            )
            await asyncio.sleep(max(0.0, args.hold_s + 2 - 12))
            for name, clients in (("slow heads", heads), ("slow bodies", bodies)):
                done = sorted(clients.held_s)
                print(
                    f"{name} held past {args.hold_s:.0f} s: {clients.held_longer_than(args.hold_s)}/"
                    f"{clients.count}; dropped by the server: {len(done)}"
                    + (f", held median {statistics.median(done):.1f} s, max {done[-1]:.1f} s" if done else "")
                )
            await bodies.stop()
        if "streams" not in args.phases:
            await heads.stop()
            return

        # 3. event streams, with the slow heads still going
        async with httpx.AsyncClient(
            base_url=served.url, headers={"Authorization": f"Bearer {served.key}"}, timeout=60
        ) as client:
            created = (
                await client.post("/v1/sessions", json={"user_id": "bench", "provider": "demo"})
            ).json()
            session_id = created["id"]
            while (await client.get(f"/v1/sessions/{session_id}")).json()["status"] != "awaiting_user":
                await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # the sandbox settles
        before = served.rss_mib()
        started = time.perf_counter()
        opened = await bounded(
            100, [lambda: open_stream(served.port, served.key, session_id) for _ in range(args.streams)]
        )
        took = time.perf_counter() - started
        streams = [o for o in opened if isinstance(o, tuple)]
        statuses: dict[str, int] = {}
        for o in opened:
            label = str(o[0]) if isinstance(o, tuple) else type(o).__name__
            statuses[label] = statuses.get(label, 0) + 1
        await asyncio.sleep(2)
        grown = served.rss_mib() - before
        print(
            f"{args.streams} event streams opened in {took:.1f} s ({statuses}); "
            f"RSS +{grown:.0f} MiB ({grown * 1024 / max(1, len(streams)):.0f} KiB each)"
        )
        cpu = served.cpu_s()
        idle_started = time.perf_counter()
        await asyncio.sleep(10)
        print(
            f"controller CPU with {len(streams)} idle streams and 300 slow heads: "
            f"{(served.cpu_s() - cpu) / (time.perf_counter() - idle_started) * 100:.0f} % of a core"
        )
        times = await timed_requests(served, 40, 0.25, f"/v1/sessions/{session_id}")
        print(latency_line(f"GET /v1/sessions/{{id}} ({len(streams)} streams, 300 slow heads)", times))
        await heads.stop()
        await asyncio.sleep(1)
        times = await timed_requests(served, 40, 0.25, f"/v1/sessions/{session_id}")
        print(latency_line(f"GET /v1/sessions/{{id}} ({len(streams)} streams)", times))
        for _status, writer, reading in streams:
            writer.close()
            reading.cancel()
    finally:
        if session_id:
            await cancel(served, session_id)
        served.process.terminate()
        try:
            await asyncio.to_thread(served.process.wait, 30)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=30.0, help="how long a slow client may be held")
    parser.add_argument(
        "--phases",
        default="headers,slow,streams",
        help="which of headers, slow, streams to run (comma-separated)",
    )
    asyncio.run(main(parser.parse_args()))
