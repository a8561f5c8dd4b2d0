"""Sessions through the client, against a real controller and real sandboxes."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast

import pytest

from browservm_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    SessionEnded,
    SessionStatus,
    WaitTimeout,
)
from tests.client.proxy import CuttingProxy
from tests.controller.conftest import Controller


async def test_create_get_list_by_pages_and_cancel(api: AsyncClient) -> None:
    created = [await api.sessions.create(user_id=f"pager-{n}", provider="demo") for n in range(3)]
    assert all(s.status == SessionStatus.PENDING and s.viewer_url for s in created)
    assert (await api.sessions.get(created[0].id)).user_id == "pager-0"

    pages = [page async for page in api.sessions.list(page_size=2).pages()]
    assert [len(page.data) for page in pages] == [2, 1]
    listed = [s.id async for s in api.sessions.list(page_size=2)]
    assert listed == [s.id for s in reversed(created)]  # newest first, across pages
    assert [s.id async for s in api.sessions.list(user_id="pager-1")] == [created[1].id]

    for session in created:
        assert (await api.sessions.cancel(session.id)).status == SessionStatus.CANCELLED
    assert [s.id async for s in api.sessions.list(status="pending")] == []
    with pytest.raises(Conflict) as ended:
        await api.sessions.cancel(created[0].id)
    assert ended.value.code == "session_ended" and ended.value.status == 409


async def test_api_errors_carry_the_code_and_message(api: AsyncClient, controller: Controller) -> None:
    with pytest.raises(NotFound) as missing:
        await api.sessions.get("ses_doesnotexist")
    assert missing.value.code == "session_not_found" and "ses_doesnotexist" in missing.value.message

    with pytest.raises(InvalidRequest) as invalid:
        await api.sessions.create(user_id="u", provider=cast(Any, "netscape"))
    assert invalid.value.code == "invalid_request" and "provider" in invalid.value.message

    async with AsyncClient("bvm_wrong", base_url=controller.url) as stranger:
        with pytest.raises(AuthenticationError) as refused:
            await stranger.sessions.get("ses_x")
    assert refused.value.code == "invalid_api_key"
    assert [s async for s in api.sessions.list()] == []  # nothing was created by any of that


async def test_events_resume_after_the_connection_drops(api: AsyncClient, controller: Controller) -> None:
    session = await api.sessions.create(user_id="resumer", provider="demo")
    async with (
        CuttingProxy(controller.settings.port) as proxy,
        AsyncClient(controller.key, base_url=proxy.url) as through_proxy,
    ):
        seen = []
        async for event in through_proxy.sessions.events(session.id):
            seen.append(event)
            if len(seen) == 2:
                proxy.cut()
            if len(seen) == 3:
                await api.sessions.cancel(session.id)
    # The second connection asked for what follows the last event received (events read into the
    # buffer before the cut still count as received).
    assert len(proxy.requests) >= 2
    header = re.search(rb"\r\nlast-event-id: (\d+)\r\n", proxy.requests[1].lower())
    assert header, proxy.requests[1]
    assert int(header[1]) >= seen[1].id and int(header[1]) in {e.id for e in seen}
    # Nothing lost, nothing twice: the same events as one unbroken read, ending with the cancel.
    unbroken = [event async for event in api.sessions.events(session.id)]
    assert [e.id for e in seen] == [e.id for e in unbroken]
    assert seen[-1].status == SessionStatus.CANCELLED and seen[0].status == SessionStatus.PENDING


async def test_wait_returns_the_wanted_status_times_out_or_reports_another_ending(api: AsyncClient) -> None:
    session = await api.sessions.create(user_id="waiter", provider="demo")
    with pytest.raises(WaitTimeout) as late:
        await api.sessions.wait(session.id, "completed", timeout=0.5)
    assert late.value.session_id == session.id

    waiting = await api.sessions.wait(session.id, "awaiting_user", timeout=60)
    assert waiting.login_url and "/demo/oauth/authorize" in waiting.login_url

    waiter = asyncio.create_task(api.sessions.wait(session.id, SessionStatus.COMPLETED, timeout=60))
    await api.sessions.cancel(session.id)
    with pytest.raises(SessionEnded) as ended:
        await waiter
    assert ended.value.session.status == SessionStatus.CANCELLED
    assert (await api.sessions.wait(session.id)).status == SessionStatus.CANCELLED  # any ending


async def test_the_sync_client_has_the_same_calls(controller: Controller) -> None:
    def scenario() -> None:
        with Client(controller.key, base_url=controller.url) as client:
            assert client.health() and client.ready().ready
            session = client.sessions.create(user_id="sync-user", provider="demo")
            assert [s.id for s in client.sessions.list()] == [session.id]
            assert [len(p.data) for p in client.sessions.list(page_size=1).pages()] == [1]
            with pytest.raises(WaitTimeout):  # nobody signs in
                client.sessions.wait(session.id, "completed", timeout=0.5)
            waiting = client.sessions.wait(session.id, "awaiting_user", timeout=60)
            assert waiting.sandbox_id
            fresh = client.sessions.viewer_url(session.id)
            assert fresh.startswith(f"{controller.url}/view/{session.id}?token=")
            client.sessions.cancel(session.id)
            statuses = [e.status for e in client.sessions.events(session.id) if e.status]
            assert statuses[0] == "pending" and statuses[-1] == "cancelled"
            with pytest.raises(SessionEnded):
                client.sessions.wait(session.id, "completed", timeout=30)
            assert "browservm_sessions" in client.metrics()

    await asyncio.to_thread(scenario)


@pytest.mark.slow
async def test_a_sync_wait_ends_on_time_although_pings_keep_the_stream_alive(controller: Controller) -> None:
    # The controller pings a quiet stream every 15 s, and each ping restarts a blocking read: the wait
    # must still give up at its timeout, not at the next ping after it.
    def wait_in_vain() -> float:
        with Client(controller.key, base_url=controller.url) as client:
            session = client.sessions.create(user_id="patient", provider="demo")
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                client.sessions.wait(session.id, "completed", timeout=18)
            elapsed = time.monotonic() - started
            client.sessions.cancel(session.id)
            return elapsed

    elapsed = await asyncio.to_thread(wait_in_vain)
    assert 18 <= elapsed < 19.5


async def test_a_fresh_viewer_link_capacity_and_the_tenants_events(api: AsyncClient) -> None:
    events = api.events()
    created = await api.sessions.create(user_id="linker", provider="demo")
    link = await api.sessions.viewer_link(created.id)
    assert link.viewer_url.endswith(link.token) and f"/view/{created.id}?token=" in link.viewer_url
    assert link.expires_at <= created.expires_at
    capacity = await api.capacity()
    assert capacity.limit == 1 and capacity.in_use <= 1
    # The tenant's stream (from now) tells of the session as it moves, whatever the session.
    async with asyncio.timeout(30):
        async for event in events:
            if event.kind == "session.status" and event.data.get("session_id") == created.id:
                break
    await api.sessions.cancel(created.id)
    with pytest.raises(Conflict) as ended:
        await api.sessions.viewer_link(created.id)
    assert ended.value.code == "session_ended"
