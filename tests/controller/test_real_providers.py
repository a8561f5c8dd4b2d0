"""The three real CLIs sign in through the served product: a controller started as the README starts it
(``scripts/run.sh``), the public API, the CLIs as the guest image installed them. This machine has no
internet, so a sign-in cannot finish here; each CLI prints (or opens) its authorization URL before any
network call of its own, and that URL open in the sandbox's browser is ``awaiting_user``."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from browservm_client import Client
from tests.support.served import Served, run_sh

pytestmark = [pytest.mark.browser, pytest.mark.slow]

AUTHORIZE = {
    # provider: (the authorization URL's host, where its loopback callback lives)
    "codex": ("auth.openai.com", "127.0.0.1"),
    "claude_code": ("claude.com", "localhost"),
    "gemini_cli": ("accounts.google.com", "127.0.0.1"),
}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with run_sh(warm_pool_size="0", max_sandboxes="3") as running:
        yield running


@pytest.mark.parametrize("provider", sorted(AUTHORIZE))
def test_a_real_cli_reaches_awaiting_user_through_the_api(served: Served, provider: str) -> None:
    host, callback_host = AUTHORIZE[provider]
    with Client(served.key, base_url=served.url, timeout=30) as client:
        session = client.sessions.create(user_id=f"real-{provider}", provider=provider)  # type: ignore[arg-type]
        try:
            waiting = client.sessions.wait(session.id, "awaiting_user", timeout=120)
        finally:
            client.sessions.cancel(session.id) if not client.sessions.get(
                session.id
            ).status.terminal else None
    assert waiting.login_url is not None
    url = urlsplit(waiting.login_url)
    assert url.scheme == "https" and (url.hostname or "").endswith(host), waiting.login_url
    query = parse_qs(url.query)
    assert query.get("client_id"), waiting.login_url
    redirect = urlsplit(query["redirect_uri"][0])
    # The CLI's own loopback callback, inside the sandbox: never rewritten.
    assert redirect.scheme == "http" and redirect.hostname == callback_host, query["redirect_uri"]
