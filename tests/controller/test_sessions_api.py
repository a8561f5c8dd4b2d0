"""The sessions API as an operator's backend uses it, against a real controller and real sandboxes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from tests.controller.conftest import Controller, controller_settings, run_controller


async def test_every_route_needs_a_valid_api_key(controller: Controller) -> None:
    async with httpx.AsyncClient(base_url=controller.url) as anonymous:
        for method, path in [
            ("GET", "/v1/sessions"),
            ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions/ses_x"),
            ("POST", "/v1/sessions/ses_x/cancel"),
            ("GET", "/v1/sessions/ses_x/events"),
        ]:
            response = await anonymous.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = await anonymous.get("/v1/sessions", headers={"Authorization": "Bearer bvm_nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"


async def test_bad_input_gets_a_4xx_that_names_the_field(controller: Controller) -> None:
    client = controller.client
    unknown = await client.post("/v1/sessions", json={"user_id": "u1", "provider": "netscape"})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "invalid_request"
    assert "provider" in unknown.json()["error"]["message"]
    assert "claude_code" in unknown.json()["error"]["message"]

    missing = await client.post("/v1/sessions", json={"provider": "demo"})
    assert missing.status_code == 422 and "user_id" in missing.json()["error"]["message"]

    bad_user = await client.post("/v1/sessions", json={"user_id": "a b/../c", "provider": "demo"})
    assert bad_user.status_code == 422 and "user_id" in bad_user.json()["error"]["message"]

    malformed = await client.post(
        "/v1/sessions", content=b'{"user_id": "u1", "provider":', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "malformed_json"

    huge = await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo", "pad": "x" * 200_000})
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "body_too_large"

    absent = await client.get("/v1/sessions/ses_doesnotexist")
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "session_not_found"

    bad_cursor = await client.get("/v1/sessions", params={"cursor": "garbage"})
    assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["code"] == "invalid_cursor"

    # Nothing was created by any of that.
    assert (await client.get("/v1/sessions")).json()["data"] == []


async def test_create_answers_at_once_then_cancel_destroys_the_sandbox(controller: Controller) -> None:
    client = controller.client
    created = await client.post("/v1/sessions", json={"user_id": "alice", "provider": "demo"})
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "pending"
    assert body["id"].startswith("ses_")
    assert body["viewer_url"].startswith(f"{controller.url}/view/{body['id']}?token=v1.")
    assert body["expires_at"]

    session_id = body["id"]
    running = await controller.wait_status(session_id, "awaiting_user", "failed")
    assert running["status"] == "awaiting_user", running["reason"]
    sandbox_dirs = list((controller.settings.state_dir / "sandboxes").iterdir())
    assert len(sandbox_dirs) == 1

    cancelled = await client.post(f"/v1/sessions/{session_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = await client.post(f"/v1/sessions/{session_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "session_ended"

    # The sandbox is destroyed: its directory (and process tree) is gone.
    for _ in range(100):
        if not any((controller.settings.state_dir / "sandboxes").iterdir()):
            break
        await asyncio.sleep(0.1)
    assert not any((controller.settings.state_dir / "sandboxes").iterdir())

    # Every state change is in the event stream, which ends once the session has ended.
    async with client.stream("GET", f"/v1/sessions/{session_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        statuses = []
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["kind"] == "session.status":
                    statuses.append(event["status"])
    assert statuses[0] == "pending" and statuses[-1] == "cancelled"
    assert "starting" in statuses


async def test_sessions_are_scoped_to_the_tenant_and_paginated(controller: Controller) -> None:
    client = controller.client
    ids = []
    for user in ("u1", "u1", "u2"):
        response = await client.post("/v1/sessions", json={"user_id": user, "provider": "codex"})
        ids.append(response.json()["id"])
    for session_id in ids:
        await client.post(f"/v1/sessions/{session_id}/cancel")

    first = (await client.get("/v1/sessions", params={"limit": 2})).json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    second = (await client.get("/v1/sessions", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert second["next_cursor"] is None
    assert sorted(s["id"] for s in first["data"] + second["data"]) == sorted(ids)

    mine = (await client.get("/v1/sessions", params={"user_id": "u1", "status": "cancelled"})).json()
    assert {s["user_id"] for s in mine["data"]} == {"u1"} and len(mine["data"]) == 2

    other_key = await controller.new_key(tenant="someone-else")
    async with httpx.AsyncClient(
        base_url=controller.url, headers={"Authorization": f"Bearer {other_key}"}
    ) as other:
        assert (await other.get("/v1/sessions")).json()["data"] == []
        stolen = await other.get(f"/v1/sessions/{ids[0]}")
        assert stolen.status_code == 404
        assert (await other.post(f"/v1/sessions/{ids[0]}/cancel")).status_code == 404


async def test_capacity_is_bounded_and_overflow_is_refused_with_a_reason(
    tmp_path: Path, database_url: str
) -> None:
    settings = controller_settings(tmp_path, database_url, max_sandboxes=1, max_queued_sessions=1)
    async with run_controller(settings) as controller:
        client = controller.client
        first = (await client.post("/v1/sessions", json={"user_id": "a", "provider": "demo"})).json()
        second = (await client.post("/v1/sessions", json={"user_id": "b", "provider": "demo"})).json()
        refused = await client.post("/v1/sessions", json={"user_id": "c", "provider": "demo"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "capacity_exhausted"
        assert refused.headers["retry-after"]
        metrics = (await client.get("/metrics")).text
        assert "browservm_sessions_refused_total 1.0" in metrics

        await controller.wait_status(first["id"], "starting", "awaiting_user")
        # The second waits its turn: no sandbox for it while the first holds the only slot.
        assert (await client.get(f"/v1/sessions/{second['id']}")).json()["status"] == "pending"
        ready = (await client.get("/readyz")).json()
        assert ready["checks"]["capacity"]["in_use"] == 1

        await client.post(f"/v1/sessions/{first['id']}/cancel")
        await controller.wait_status(second["id"], "starting", "awaiting_user")
        await client.post(f"/v1/sessions/{second['id']}/cancel")


async def test_health_readiness_and_metrics(controller: Controller) -> None:
    async with httpx.AsyncClient(base_url=controller.url) as anonymous:
        assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        ready = await anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
        await controller.client.get("/v1/sessions")
        metrics = (await anonymous.get("/metrics")).text
    assert 'browservm_sessions{status="pending"}' in metrics
    assert "browservm_sandboxes" in metrics
    assert (
        'browservm_http_request_duration_seconds_count{method="GET",route="/v1/sessions",status="2xx"}'
        in metrics
    )
