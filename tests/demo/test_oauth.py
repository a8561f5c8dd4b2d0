import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi import FastAPI

from browservm.demo.oauth import DEMO_CLIENT_ID, create_app

ISSUER = "http://127.0.0.1:9999/demo-oauth"
REDIRECT = "http://127.0.0.1:43123/callback"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(ISSUER))
    async with httpx.AsyncClient(transport=transport, base_url="http://oauth.test") as client:
        yield client


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": DEMO_CLIENT_ID,
        "redirect_uri": REDIRECT,
        "state": "st-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


async def get_code(client: httpx.AsyncClient, challenge: str, email: str = "ada@example.com") -> str:
    answer = await client.post(
        "/authorize", content=urlencode({**authorize_params(challenge), "email": email, "password": "demo"})
    )
    assert answer.status_code == 303
    location = urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["st-1"]
    return query["code"][0]


async def exchange(client: httpx.AsyncClient, code: str, verifier: str) -> httpx.Response:
    return await client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": DEMO_CLIENT_ID,
            "code_verifier": verifier,
        },
    )


async def test_authorize_shows_a_real_sign_in_form(client: httpx.AsyncClient) -> None:
    _, challenge = pkce()
    page = await client.get("/authorize", params=authorize_params(challenge))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/demo-oauth/authorize">' in page.text
    assert 'name="email" type="email"' in page.text
    assert 'name="password" type="password"' in page.text
    assert '<button type="submit">Sign in</button>' in page.text
    assert f'name="code_challenge" value="{challenge}"' in page.text


async def test_code_flow_with_pkce_issues_tokens_and_userinfo(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    code = await get_code(client, challenge)
    tokens = await exchange(client, code, verifier)
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    assert body["token_type"] == "Bearer"
    assert body["account"]["email"] == "ada@example.com"
    claims_part = body["id_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
    assert claims["email"] == "ada@example.com"
    assert claims["iss"] == ISSUER
    me = await client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.json()["email"] == "ada@example.com"
    # Codes are single use.
    again = await exchange(client, code, verifier)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


async def test_wrong_code_verifier_is_refused(client: httpx.AsyncClient) -> None:
    _, challenge = pkce()
    code = await get_code(client, challenge)
    other_verifier, _ = pkce()
    answer = await exchange(client, code, other_verifier)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_grant",
        "error_description": "code_verifier does not match the code_challenge",
    }


async def test_wrong_password_shows_the_form_again_with_an_error(client: httpx.AsyncClient) -> None:
    _, challenge = pkce()
    form = {**authorize_params(challenge), "email": "ada@example.com", "password": "nope"}
    answer = await client.post("/authorize", content=urlencode(form))
    assert answer.status_code == 401
    assert "Wrong email or password." in answer.text
    assert 'value="ada@example.com"' in answer.text


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example/callback",
        "http://192.0.2.1:8080/callback",
        "http://127.0.0.1:4000/other",
        "http://127.0.0.1:4000/callback?next=x",
    ],
)
async def test_unregistered_redirect_gets_an_error_page_never_a_redirect(
    client: httpx.AsyncClient, redirect_uri: str
) -> None:
    _, challenge = pkce()
    page = await client.get("/authorize", params=authorize_params(challenge, redirect_uri=redirect_uri))
    assert page.status_code == 400
    assert "location" not in page.headers
    assert "is not registered" in page.text


async def test_missing_pkce_is_reported_to_the_client(client: httpx.AsyncClient) -> None:
    params = authorize_params("x")
    del params["code_challenge"]
    answer = await client.get("/authorize", params=params)
    assert answer.status_code == 303
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["error"] == ["invalid_request"]
    assert query["state"] == ["st-1"]


async def test_refresh_tokens_rotate_and_work_once(client: httpx.AsyncClient) -> None:
    verifier, challenge = pkce()
    first = (await exchange(client, await get_code(client, challenge), verifier)).json()
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": first["refresh_token"],
        "client_id": DEMO_CLIENT_ID,
    }
    second = await client.post("/token", data=refresh)
    assert second.status_code == 200
    assert second.json()["refresh_token"] != first["refresh_token"]
    reused = await client.post("/token", data=refresh)
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert "already used" in reused.json()["error_description"]


async def test_unknown_grant_and_bad_bearer_are_oauth_errors(client: httpx.AsyncClient) -> None:
    answer = await client.post("/token", data={"grant_type": "password"})
    assert answer.json()["error"] == "unsupported_grant_type"
    me = await client.get("/userinfo", headers={"Authorization": "Bearer nope"})
    assert me.status_code == 401
    assert me.headers["www-authenticate"].startswith("Bearer")


async def test_configured_users_replace_the_any_email_rule() -> None:
    app = create_app(ISSUER, users={"grace@example.com": "hopper"})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://oauth.test"
    ) as client:
        _, challenge = pkce()
        base = authorize_params(challenge)
        demo = await client.post(
            "/authorize", content=urlencode({**base, "email": "ada@example.com", "password": "demo"})
        )
        assert demo.status_code == 401
        ok = await client.post(
            "/authorize", content=urlencode({**base, "email": "grace@example.com", "password": "hopper"})
        )
        assert ok.status_code == 303


async def test_form_posts_to_the_issuer_path_when_mounted_under_a_prefix() -> None:
    outer = FastAPI()
    outer.mount("/demo/oauth", create_app("http://controller.test/demo/oauth"))
    _, challenge = pkce()
    params = urlencode(authorize_params(challenge))
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://controller.test") as client:
        page = await client.get(f"/demo/oauth/authorize?{params}")
        assert '<form method="post" action="/demo/oauth/authorize">' in page.text
        answer = await client.post(
            "/demo/oauth/authorize",
            content=urlencode(
                {**authorize_params(challenge), "email": "ada@example.com", "password": "demo"}
            ),
        )
        assert answer.status_code == 303
        assert answer.headers["location"].startswith(f"{REDIRECT}?code=")
