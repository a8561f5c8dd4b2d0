"""Bad input an attacker sent (issue 11, item 9) and its siblings: each is a 4xx with a reason in the uniform
body, never a server error, and the controller keeps serving."""

from __future__ import annotations

import asyncio
import base64
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import websockets.asyncio.client
from websockets.exceptions import InvalidStatus

from browservm.controller.auth import issue_viewer_token
from tests.controller.conftest import Controller
from tests.controller.viewer_testbed import viewer_bed


def secret_of(controller: Controller) -> bytes:
    return (controller.settings.state_dir / "controller.key").read_bytes().strip()


async def raw_get(controller: Controller, path: str, headers: dict[str, bytes]) -> tuple[int, bytes]:
    """A GET with header values as raw bytes (httpx refuses non-ASCII ones)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", controller.settings.port)
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: x", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_non_ascii_in_a_viewer_token_or_session_id_is_refused(controller: Controller) -> None:
    secret = secret_of(controller)
    expires = time.time() + 300
    valid = issue_viewer_token(secret, "ses_x", expires)
    payload = valid.rsplit(".", 1)[0]
    async with httpx.AsyncClient(base_url=controller.url) as client:
        # A signature with a non-ASCII character: compare_digest raised TypeError (500).
        forged = await client.get("/v1/sessions/ses_x/ice-servers", params={"token": f"{payload}.é"})
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_token"
        # A well-signed token for a session id with a non-ASCII character, used elsewhere, and the reverse.
        odd = issue_viewer_token(secret, "ses_é", expires)
        other = await client.get("/v1/sessions/ses_x/ice-servers", params={"token": odd})
        assert other.status_code == 403 and other.json()["error"]["code"] == "wrong_session"
        path = await client.get("/v1/sessions/ses_é/ice-servers", params={"token": valid})
        assert path.status_code == 403
        # The viewer page says the same on its refusal page.
        page = await client.get("/view/ses_é", params={"token": valid})
        assert page.status_code == 403 and "another session" in page.text
        # WHEP takes the token as a header, where the byte arrives as latin-1.
        whep = await client.post(
            "/v1/sessions/ses_x/whep",
            content=b"v=0\r\n",
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {payload}.x"},
        )
        assert whep.status_code == 401
    status, body = await raw_get(
        controller,
        "/v1/sessions/ses_x/ice-servers",
        {"Authorization": b"Bearer " + payload.encode() + b".\xe9"},
    )
    assert status == 401 and b"invalid_token" in body
    # The WebSocket routes check the same token.
    for route in ("signal", "vnc"):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.asyncio.client.connect(
                f"{controller.url.replace('http', 'ws')}/v1/sessions/ses_x/{route}?token={payload}.%C3%A9"
            )
        assert refused.value.response.status_code == 401
    assert (await controller.client.get("/healthz")).status_code == 200


async def test_a_password_with_non_ascii_characters_is_a_wrong_password(controller: Controller) -> None:
    form = {
        "client_id": "browservm-demo-cli",
        "redirect_uri": "http://127.0.0.1:4242/callback",
        "response_type": "code",
        "code_challenge": "x" * 43,
        "code_challenge_method": "S256",
        "email": "a@example.com",
        "password": "démo",
    }
    # The demo sign-in server listens on a port of its own (docs/network.md), on the loopback too.
    issuer = f"http://127.0.0.1:{controller.settings.demo_oauth_port}"
    async with httpx.AsyncClient(base_url=issuer) as client:
        refused = await client.post("/demo/oauth/authorize", data=form)
    assert refused.status_code == 401 and "Wrong email or password" in refused.text


async def test_last_event_id_that_is_not_an_event_id_is_refused(controller: Controller) -> None:
    client = controller.client
    session = (await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo"})).json()
    await client.post(f"/v1/sessions/{session['id']}/cancel")
    url = f"/v1/sessions/{session['id']}/events"
    # "²" passed isdigit() and failed int() (500); 20 digits overflowed the database's int64 after the
    # stream had started (200, then a broken stream); the others were silently read as 0.
    for value in ["²", "99999999999999999999", "9223372036854775808", "-1", "12abc", "0x10"]:
        refused = await client.get(url, headers={"Last-Event-ID": value.encode("latin-1")})
        assert refused.status_code == 400, (value, refused.text)
        assert refused.json()["error"]["code"] == "invalid_last_event_id"
    everything = (await client.get(url)).text
    ids = [int(line[3:].strip()) for line in everything.splitlines() if line.startswith("id:")]
    assert len(ids) >= 2, everything
    resumed = (await client.get(url, headers={"Last-Event-ID": str(ids[0])})).text
    resumed_ids = [int(line[3:].strip()) for line in resumed.splitlines() if line.startswith("id:")]
    # From the next event on (the sandbox's last events may land between the two reads).
    assert resumed_ids[0] == ids[1] and resumed_ids == sorted(resumed_ids), (ids, resumed_ids)
    assert (await client.get(url, headers={"Last-Event-ID": str(2**63 - 1)})).status_code == 200


async def test_a_cursor_with_a_naive_or_impossible_time_is_refused(controller: Controller) -> None:
    def cursor(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    for forged in [
        cursor("2026-01-01T00:00:00|ses_x"),  # naive: the store refused it with a ValueError (500)
        cursor("0001-01-01T00:00:00+01:00|ses_x"),  # before year 1 in UTC
        cursor("9999-12-31T23:59:59-01:00|ses_x"),  # after year 9999 in UTC
    ]:
        refused = await controller.client.get("/v1/sessions", params={"cursor": forged})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "invalid_cursor"
    fine = await controller.client.get(
        "/v1/sessions", params={"cursor": cursor("2026-01-01T00:00:00+00:00|x")}
    )
    assert fine.status_code == 200


async def test_a_nul_character_in_an_id_or_a_parameter_is_refused(controller: Controller) -> None:
    # PostgreSQL cannot compare a string holding NUL: each of these was a 500 there.
    nul_cursor = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|ses_\x00").decode()
    for method, path in [
        ("GET", "/v1/sessions/ses_%00x"),
        ("POST", "/v1/sessions/ses_%00x/cancel"),
        ("GET", "/v1/sessions/ses_%00x/events"),
        ("GET", "/v1/sessions?user_id=a%00b"),
        ("DELETE", "/v1/users/u1/credentials/cre_%00"),
        ("GET", "/view/ses_%00?token=x"),
    ]:
        refused = await controller.client.request(method, path)
        assert refused.status_code == 400, (method, path, refused.text)
        assert "NUL" in refused.json()["error"]["message"]
    cursor = await controller.client.get("/v1/sessions", params={"cursor": nul_cursor})
    assert cursor.status_code == 400 and cursor.json()["error"]["code"] == "invalid_cursor"
    with pytest.raises(InvalidStatus) as refused_socket:
        await websockets.asyncio.client.connect(
            f"{controller.url.replace('http', 'ws')}/v1/sessions/%00/signal"
        )
    assert refused_socket.value.response.status_code == 400


async def test_a_binary_frame_on_the_signaling_socket_closes_it_with_a_reason() -> None:
    async with viewer_bed() as bed:
        url = f"{bed.ws_url}/v1/sessions/{bed.session_id}/signal?token={bed.token}"
        async with websockets.asyncio.client.connect(url) as ws:
            await ws.recv()  # hello
            await ws.send(b"\x00\x01binary")
            async with asyncio.timeout(10):
                await ws.wait_closed()
        assert ws.close_code == 1003, (ws.close_code, ws.close_reason)
        assert "text frames" in (ws.close_reason or "")
        # The relay is fine afterwards: a new socket gets its hello.
        async with websockets.asyncio.client.connect(url) as ws:
            assert "hello" in await ws.recv()


@pytest.mark.browser
async def test_whep_with_a_malformed_offer_is_a_400_from_the_real_streamer(controller: Controller) -> None:
    client = controller.client
    session = (await client.post("/v1/sessions", json={"user_id": "u1", "provider": "demo"})).json()
    waiting = await controller.wait_status(session["id"], "awaiting_user", "failed")
    assert waiting["status"] == "awaiting_user", waiting
    token = parse_qs(urlsplit(waiting["viewer_url"]).query)["token"][0]
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}
    malformed = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nm=video nonsense\r\na=mid\r\n"
    async with httpx.AsyncClient(base_url=controller.url, timeout=30) as viewer:
        deadline = time.monotonic() + 30
        while True:
            answer = await viewer.post(
                f"/v1/sessions/{session['id']}/whep", content=malformed, headers=headers
            )
            if answer.status_code != 409 or time.monotonic() > deadline:
                break  # 409: the streamer is still starting
            await asyncio.sleep(0.5)
    # The streamer refused it as the offer's fault: before, the controller answered 502.
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "bad_offer"
    await client.post(f"/v1/sessions/{session['id']}/cancel")
