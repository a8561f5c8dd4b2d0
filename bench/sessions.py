"""How fast a user gets from "the operator asked for a session" to "signed in", on the process backend.

Starts a real controller (SQLite, process sandboxes) on loopback, then for each round: creates a `demo`
session, waits until the login page is open in the sandbox's Chromium (`awaiting_user`), signs in by
typing into that page over DevTools, waits for `completed` (sealed, stored, delivered), and waits until the
browser sandbox is gone. Prints a table of medians. Not a test: figures depend on the machine.

With a warm pool (the default, one sandbox), each round starts once the pool is full again: sessions that
arrive no faster than the pool refills (~2 s here). ``--warm-pool 0`` measures the cold path, where each
session boots its own sandbox.

    .venv/bin/python bench/sessions.py --rounds 5
    .venv/bin/python bench/sessions.py --rounds 5 --warm-pool 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import uvicorn
import websockets

from browservm.controller.app import create_app
from browservm.settings import Settings
from browservm.store import api_keys
from browservm.store.database import Database
from browservm_client import AsyncClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _warm(client: AsyncClient, size: int) -> None:
    while f"browservm_warm_pool_idle {size:.1f}" not in await client.metrics():
        await asyncio.sleep(0.05)


async def _sign_in(sandbox: Path, email: str) -> None:
    port = int((sandbox / "run/chromium-profile/DevToolsActivePort").read_text().split()[0])
    async with httpx.AsyncClient() as client:
        while True:
            pages = [
                t for t in (await client.get(f"http://127.0.0.1:{port}/json")).json() if t["type"] == "page"
            ]
            page = next((p for p in pages if "/demo/oauth/authorize" in p["url"]), None)
            if page:
                break
            await asyncio.sleep(0.05)
    script = (
        f"document.querySelector('#email').value={json.dumps(email)};"
        "document.querySelector('#password').value='demo';"
        "document.querySelector('button[type=submit]').click(); true"
    )
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
        await ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": script}}))
        while json.loads(await ws.recv()).get("id") != 1:
            pass


async def main(rounds: int, warm_pool: int) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    port = _free_port()
    settings = Settings(
        state_dir=state_dir,
        port=port,
        log_level="warning",
        log_json=False,
        reconcile_interval_s=5,
        warm_pool_size=warm_pool,
        devtools_debug_port=True,  # the bench signs in by typing into the page over DevTools
    )
    db = Database(settings.effective_database_url)
    await db.migrate()
    async with db.session() as s:
        _key, secret = await api_keys.create(s, name="bench")
    await db.close()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    rows: dict[str, list[float]] = {k: [] for k in ("create", "awaiting_user", "completed", "destroyed")}
    async with AsyncClient(secret, base_url=f"http://127.0.0.1:{port}") as client:
        await client.cli_vms.create("bench")
        for n in range(rounds):
            await _warm(client, warm_pool)
            start = time.perf_counter()
            created = await client.sessions.create(user_id="bench", provider="demo")
            rows["create"].append(time.perf_counter() - start)
            # The client follows the session's event stream: it hears each change as it is stored.
            waiting = await client.sessions.wait(created.id, "awaiting_user", timeout=120)
            rows["awaiting_user"].append(time.perf_counter() - start)
            assert waiting.sandbox_id
            sandbox = state_dir / "sandboxes" / waiting.sandbox_id
            await _sign_in(sandbox, f"user{n}@example.com")
            await client.sessions.wait(created.id, "completed", timeout=120)
            rows["completed"].append(time.perf_counter() - start)
            while sandbox.exists():
                await asyncio.sleep(0.02)
            rows["destroyed"].append(time.perf_counter() - start)
        rss = psutil.Process().memory_info().rss / 2**20
        hit_line = next(
            (line for line in (await client.metrics()).splitlines() if 'result="hit"}' in line), "0"
        )
        hits = int(float(hit_line.rsplit(" ", 1)[-1]))
        await client.cli_vms.delete("bench")
    server.should_exit = True
    await task
    print(
        f"{rounds} rounds, process backend, SQLite, warm pool {warm_pool} ({hits} "
        "sessions took a warm sandbox); seconds from POST /v1/sessions (median, min-max)"
    )
    print(f"{'step':<16} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in rows.items():
        print(f"{name:<16} {statistics.median(values):>8.3f} {min(values):>8.3f} {max(values):>8.3f}")
    print(f"controller RSS after the rounds: {rss:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-pool", type=int, default=1, help="BROWSERVM_WARM_POOL_SIZE (0: cold starts)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.warm_pool))
