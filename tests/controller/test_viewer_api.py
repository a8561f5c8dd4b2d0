"""What the viewer and the dashboard read from the API, against a real controller with real sandboxes:
the session's state for its viewer (viewer token, queue position from the capacity queue, endings in
words for the user), fresh viewer links, the tenant's live events, and the host's capacity."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.controller.conftest import Controller, controller_settings, run_controller


def token_of(session: dict[str, Any]) -> str:
    return str(session["viewer_url"].split("token=", 1)[1])


@contextlib.asynccontextmanager
async def sse(
    client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[asyncio.Queue[tuple[str, dict[str, Any]]]]:
    """Read a Server-Sent Events stream in the background; its events land in the queue, then None."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    ready = asyncio.get_running_loop().create_future()

    async def read() -> None:
        try:
            async with client.stream("GET", path, headers=headers, timeout=None) as stream:
                ready.set_result(stream.status_code)
                kind = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        queue.put_nowait((kind, json.loads(line[5:])))
        finally:
            if not ready.done():
                ready.set_result(0)
            queue.put_nowait(None)

    task = asyncio.create_task(read())
    try:
        assert await ready == 200
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_matching(queue: asyncio.Queue[Any], predicate: Any, timeout_s: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            item = await queue.get()
            assert item is not None, "the stream ended first"
            if predicate(*item):
                return dict(item[1])


def viewer(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_of(session)}"}


async def test_viewer_events_need_this_sessions_viewer_token(controller: Controller) -> None:
    client = controller.client
    one = (await client.post("/v1/sessions", json={"user_id": "v1", "provider": "codex"})).json()
    two = (await client.post("/v1/sessions", json={"user_id": "v2", "provider": "codex"})).json()
    path = f"/v1/sessions/{one['id']}/viewer-events"
    async with httpx.AsyncClient(base_url=controller.url) as anonymous:
        missing = await anonymous.get(path)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        # The operator's API key is not a viewer token: the page's credential is the only one it takes.
        with_key = await anonymous.get(path, headers={"Authorization": f"Bearer {controller.key}"})
        assert with_key.status_code == 401 and with_key.json()["error"]["code"] == "invalid_token"
        foreign = await anonymous.get(path, headers=viewer(two))
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "wrong_session"
    for session in (one, two):
        await client.post(f"/v1/sessions/{session['id']}/cancel")


async def test_a_queued_session_learns_its_place_and_moves_up(tmp_path: Path, database_url: str) -> None:
    settings = controller_settings(tmp_path, database_url, max_sandboxes=1, max_queued_sessions=4)
    async with run_controller(settings) as controller:
        client = controller.client
        first = (await client.post("/v1/sessions", json={"user_id": "q1", "provider": "demo"})).json()
        await controller.wait_status(first["id"], "starting", "awaiting_user")
        second = (await client.post("/v1/sessions", json={"user_id": "q2", "provider": "demo"})).json()
        third = (await client.post("/v1/sessions", json={"user_id": "q3", "provider": "demo"})).json()

        async with (
            httpx.AsyncClient(base_url=controller.url) as page,
            sse(page, f"/v1/sessions/{third['id']}/viewer-events", viewer(third)) as updates,
        ):
            state = await next_matching(updates, lambda kind, data: data.get("queue_position") == 2)
            assert state == {
                "session_id": third["id"],
                "status": "pending",
                "reason": "",
                "queue_position": 2,
            }
            assert (await client.get(f"/v1/sessions/{third['id']}")).json()["queue_position"] == 2
            capacity = (await client.get("/v1/capacity")).json()
            assert capacity["limit"] == 1 and capacity["in_use"] == 1 and capacity["queued"] == 2
            assert capacity["queue"] == [
                {"session_id": second["id"], "position": 1},
                {"session_id": third["id"], "position": 2},
            ]

            # The one ahead gives up its place: the third moves up at once.
            await client.post(f"/v1/sessions/{second['id']}/cancel")
            await next_matching(updates, lambda kind, data: data.get("queue_position") == 1)
            # The slot frees: its turn comes, and it starts (no place in line any more).
            await client.post(f"/v1/sessions/{first['id']}/cancel")
            starting = await next_matching(updates, lambda kind, data: data["status"] != "pending")
            assert starting["status"] in ("starting", "awaiting_user")
            assert starting["queue_position"] is None
            await client.post(f"/v1/sessions/{third['id']}/cancel")
            ended = await next_matching(updates, lambda kind, data: data["status"] == "cancelled")
            assert ended["reason"] == "The sign-in was cancelled by the service that opened it."
            assert await updates.get() is None  # the stream ends with the session

        # The operator's record has every move, as session.queued events.
        async with client.stream("GET", f"/v1/sessions/{third['id']}/events") as stream:
            places = [
                json.loads(line[5:])["position"]
                async for line in stream.aiter_lines()
                if line.startswith("data:") and '"session.queued"' in line
            ]
        assert places == [2, 1]


async def test_an_ending_is_told_to_the_user_in_plain_words(controller: Controller) -> None:
    # An issuer the demo provider refuses: the login fails at once, with a long technical reason.
    issuer = "ftp://nowhere.invalid/" + "x" * 600
    created = (
        await controller.client.post(
            "/v1/sessions", json={"user_id": "f1", "provider": "demo", "options": {"issuer": issuer}}
        )
    ).json()
    failed = await controller.wait_status(created["id"], "failed")
    assert "issuer" in failed["reason"]  # the operator sees the technical reason
    async with (
        httpx.AsyncClient(base_url=controller.url) as page,
        sse(page, f"/v1/sessions/{created['id']}/viewer-events", viewer(created)) as updates,
    ):
        told = await next_matching(updates, lambda kind, data: kind == "session")
        assert await updates.get() is None
    assert told["status"] == "failed"
    assert told["reason"].startswith("The sign-in did not go through")
    assert "nowhere.invalid" not in told["reason"] and "ValueError" not in told["reason"]


async def test_a_fresh_viewer_link_for_a_live_session_only(controller: Controller) -> None:
    client = controller.client
    created = (await client.post("/v1/sessions", json={"user_id": "t1", "provider": "codex"})).json()
    path = f"/v1/sessions/{created['id']}/viewer-token"
    fresh = await client.post(path)
    assert fresh.status_code == 200
    link = fresh.json()
    assert link["viewer_url"] == f"{controller.url}/view/{created['id']}?token={link['token']}"
    # It never outlives the session.
    assert datetime.fromisoformat(link["expires_at"]) <= datetime.fromisoformat(created["expires_at"])
    async with httpx.AsyncClient(base_url=controller.url) as page:
        opened = await page.get(link["viewer_url"])
        assert opened.status_code == 200
        headers = {"Authorization": f"Bearer {link['token']}"}
        async with sse(page, f"/v1/sessions/{created['id']}/viewer-events", headers) as updates:
            assert (await next_matching(updates, lambda kind, data: True))["session_id"] == created["id"]

    async with httpx.AsyncClient(base_url=controller.url) as anonymous:
        refused = await anonymous.post(path)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    other_key = await controller.new_key(tenant="another-tenant")
    async with httpx.AsyncClient(
        base_url=controller.url, headers={"Authorization": f"Bearer {other_key}"}
    ) as other:
        hidden = await other.post(path)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "session_not_found"

    await client.post(f"/v1/sessions/{created['id']}/cancel")
    ended = await client.post(path)
    assert ended.status_code == 409 and ended.json()["error"]["code"] == "session_ended"


async def test_the_tenant_event_stream_shows_its_own_sessions_only(controller: Controller) -> None:
    other_key = await controller.new_key(tenant="neighbour")
    async with (
        httpx.AsyncClient(base_url=controller.url, headers={"Authorization": f"Bearer {other_key}"}) as other,
        sse(controller.client, "/v1/events") as mine,
        sse(other, "/v1/events") as theirs,
    ):
        created = (
            await controller.client.post("/v1/sessions", json={"user_id": "e1", "provider": "codex"})
        ).json()
        await controller.client.post(f"/v1/sessions/{created['id']}/cancel")
        ended = await next_matching(
            mine, lambda kind, data: kind == "session.status" and data["status"] == "cancelled"
        )
        assert ended["session_id"] == created["id"]
        neighbours = (await other.post("/v1/sessions", json={"user_id": "n1", "provider": "codex"})).json()
        await other.post(f"/v1/sessions/{neighbours['id']}/cancel")
        seen = await next_matching(theirs, lambda kind, data: data.get("status") == "cancelled")
        # The neighbour's stream never carried our session, and ours never carries theirs.
        assert seen["session_id"] == neighbours["id"]
        while not mine.empty():
            item = mine.get_nowait()
            assert item is None or item[1]["session_id"] != neighbours["id"]


@pytest.mark.slow
async def test_a_cli_vm_reports_its_own_states_and_its_recent_output(controller: Controller) -> None:
    client = controller.client
    created = await client.post("/v1/users/carol/cli-vm")
    assert created.status_code == 201 and created.json()["state"] == "running"
    listed = (await client.get("/v1/cli-vms")).json()
    assert [(vm["user_id"], vm["state"]) for vm in listed] == [("carol", "running")]

    async with client.stream(
        "POST", "/v1/users/carol/cli-vm/exec", json={"argv": ["sh", "-c", "echo hello from carol; exit 3"]}
    ) as stream:
        assert stream.status_code == 200
        async for _line in stream.aiter_lines():
            pass
    output = (await client.get("/v1/users/carol/cli-vm/output")).json()
    (run,) = output["runs"]
    assert run["argv"] == ["sh", "-c", "echo hello from carol; exit 3"]
    assert run["output"] == "hello from carol\n" and run["exit_code"] == 3 and run["ended_at"]

    hibernated = await client.post("/v1/users/carol/cli-vm/hibernate")
    assert hibernated.json()["state"] == "hibernated"
    assert (await client.get("/v1/users/carol/cli-vm")).json()["state"] == "hibernated"
    resumed = await client.post("/v1/users/carol/cli-vm/resume")
    assert resumed.json()["state"] == "running"

    assert (await client.delete("/v1/users/carol/cli-vm")).status_code == 204
    gone = await client.get("/v1/users/carol/cli-vm/output")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "cli_vm_not_found"
    assert (await client.get("/v1/cli-vms")).json() == []


async def test_the_new_routes_are_in_the_openapi_document_with_resolvable_schemas(
    controller: Controller,
) -> None:
    document = (await controller.client.get("/openapi.json")).json()
    for path in (
        "/v1/sessions/{session_id}/viewer-events",
        "/v1/sessions/{session_id}/viewer-token",
        "/v1/events",
        "/v1/capacity",
        "/v1/cli-vms",
        "/v1/users/{user_id}/cli-vm/output",
    ):
        assert path in document["paths"], path
    stream = document["paths"]["/v1/sessions/{session_id}/viewer-events"]["get"]["responses"]["200"]
    data = stream["content"]["text/event-stream"]["schema"]
    assert set(data["properties"]) == {"session_id", "status", "reason", "queue_position"}
    components = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(components), refs - set(components)
    assert "$defs" not in json.dumps(document)
