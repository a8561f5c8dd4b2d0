"""What one API key may use: requests per second and event streams, against a real controller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event

from browservm.controller.errors import ApiError
from browservm.controller.quotas import RequestRate, StreamSlots
from browservm.store import events as event_store
from browservm.store.database import Database
from tests.controller.conftest import Controller, controller_settings, run_controller


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    now = [0.0]
    rate = RequestRate(per_s=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        rate.admit("k")
    with pytest.raises(ApiError) as refused:
        rate.admit("k")
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    rate.admit("other")  # each key has its own bucket
    now[0] += 0.5  # one request's worth at 2/s
    rate.admit("k")
    with pytest.raises(ApiError):
        rate.admit("k")
    assert RequestRate(per_s=0, burst=1).admit("k") is None  # 0: no limit


def test_stream_slots_count_per_key_and_in_all() -> None:
    slots = StreamSlots(total=3, per_key=2)
    a1, _a2 = slots.take("a"), slots.take("a")
    with pytest.raises(ApiError, match="this API key already holds 2"):
        slots.take("a")
    slots.take("b")
    with pytest.raises(ApiError, match="already serves 3"):
        slots.take("c")
    a1.release()
    a1.release()  # a second release gives nothing back twice
    assert slots.open == 2
    slots.take("c")


async def test_requests_past_the_rate_get_429_with_retry_after(tmp_path: Path, database_url: str) -> None:
    settings = controller_settings(tmp_path, database_url, rate_limit_per_s=1, rate_limit_burst=5)
    async with run_controller(settings) as controller:
        statuses = [(await controller.client.get("/v1/sessions")).status_code for _ in range(5)]
        assert statuses == [200] * 5
        refused = await controller.client.get("/v1/sessions")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # Another key (another tenant's) is not held back by this one's flood.
        other = await controller.new_key(tenant="t2")
        async with httpx.AsyncClient(
            base_url=controller.url, headers={"Authorization": f"Bearer {other}"}
        ) as c:
            assert (await c.get("/v1/sessions")).status_code == 200
        # The key gets its allowance back at its rate.
        await asyncio.sleep(int(refused.headers["retry-after"]))
        assert (await controller.client.get("/v1/sessions")).status_code == 200


@contextlib.asynccontextmanager
async def open_stream(client: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    async with client.stream("GET", url) as response:
        yield response


async def test_event_streams_are_capped_per_key_and_in_all(tmp_path: Path, database_url: str) -> None:
    settings = controller_settings(tmp_path, database_url, max_event_streams=3, max_event_streams_per_key=2)
    async with run_controller(settings) as controller:
        client = controller.client
        session = (await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo"})).json()
        url = f"/v1/sessions/{session['id']}/events"
        other = await controller.new_key(name="second")
        async with (
            httpx.AsyncClient(
                base_url=controller.url, headers={"Authorization": f"Bearer {other}"}
            ) as second,
            contextlib.AsyncExitStack() as streams,
        ):
            for _ in range(2):
                assert (await streams.enter_async_context(open_stream(client, url))).status_code == 200
            refused = await client.get(url)
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert "this API key already holds 2" in refused.json()["error"]["message"]
            assert (await streams.enter_async_context(open_stream(second, url))).status_code == 200
            full = await second.get(url)
            assert full.status_code == 429 and "already serves 3" in full.json()["error"]["message"]
        # Closed streams give their slots back.
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(2):
                assert (await streams.enter_async_context(open_stream(client, url))).status_code == 200
        await client.post(f"/v1/sessions/{session['id']}/cancel")


@pytest.mark.browser
async def test_idle_event_streams_do_no_database_work(controller: Controller) -> None:
    client = controller.client
    session = (await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo"})).json()
    await controller.wait_status(session["id"], "awaiting_user")
    reads: list[str] = []
    writes: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM events" in statement and "events.session_id =" in statement:
            reads.append(statement)
        elif statement.startswith("INSERT INTO events"):
            writes.append(statement)

    streams = 20
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(streams):
            response = await stack.enter_async_context(
                open_stream(client, f"/v1/sessions/{session['id']}/events")
            )
            assert response.status_code == 200
            lines = response.aiter_lines()
            while not (await anext(lines)).startswith("data:"):
                pass  # the backlog has started to arrive: the stream is following the session
        event.listen(Engine, "before_cursor_execute", count)
        try:
            # Before, each stream read the table twice every 5 s while nothing happened.
            await asyncio.sleep(6)
        finally:
            event.remove(Engine, "before_cursor_execute", count)
    # A stream reads the table when an event was written (in this process or, seen by the one watcher
    # query every 2 s, in another), not otherwise.
    assert len(reads) <= streams * len(writes), (
        f"{len(reads)} reads by {streams} streams, {len(writes)} events"
    )
    await client.post(f"/v1/sessions/{session['id']}/cancel")


@pytest.mark.browser
async def test_a_stream_sees_events_another_process_wrote(controller: Controller) -> None:
    # Another replica (or the command line) writes to the same database; no notify reaches this one.
    client = controller.client
    session = (await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo"})).json()
    await controller.wait_status(session["id"], "awaiting_user")
    elsewhere = Database(controller.settings.effective_database_url)
    try:
        async with client.stream("GET", f"/v1/sessions/{session['id']}/events") as response:
            lines = response.aiter_lines()
            # Caught up with the boot (its last event is the streamer's), so nothing local wakes it now.
            seen = ""
            while '"service": "streamer"' not in seen:
                seen = await anext(lines)
            async with elsewhere.session() as db:
                await event_store.append(db, kind="test.elsewhere", session_id=session["id"])
            async with asyncio.timeout(10):
                while await anext(lines) != "event: test.elsewhere":
                    pass
    finally:
        await elsewhere.close()
        await client.post(f"/v1/sessions/{session['id']}/cancel")
