"""The real CLIs, up to the authorization URL they hand the browser (no internet here to go further).

Needs the CLIs from scripts/install-clis.sh (or BROWSERVM_CLI_DIR); skipped when they are missing.
"""

import asyncio
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from browservm import protocol
from browservm.guest.login import LoginRunner
from browservm.guest.providers.base import CliNotInstalled, locate_cli

URL_WAIT_S = 60.0

CASES = {
    # provider: (binary, authorization host and path, client_id, callback host, callback path, fixed port)
    "codex": (
        "codex",
        "auth.openai.com/oauth/authorize",
        "app_EMoamEEZ73f0CkXaXp7hrann",
        "127.0.0.1",
        "/auth/callback",
        1455,
    ),
    "claude_code": (
        "claude",
        "claude.com/cai/oauth/authorize",
        "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "localhost",
        "/callback",
        None,
    ),
    "gemini_cli": (
        "gemini",
        "accounts.google.com/o/oauth2/v2/auth",
        "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
        "127.0.0.1",
        "/oauth2callback",
        None,
    ),
}


def installed(binary: str) -> bool:
    try:
        locate_cli(binary, {})
    except CliNotInstalled:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("provider", list(CASES))
async def test_cli_hands_its_loopback_authorization_url_to_the_browser(provider: str, tmp_path: Path) -> None:
    binary, endpoint, client_id, callback_host, callback_path, port = CASES[provider]
    if not installed(binary):
        pytest.skip(f"{binary} is not installed; run scripts/install-clis.sh (or set BROWSERVM_CLI_DIR)")
    states: list[protocol.LoginState] = []
    opened: list[str] = []
    awaiting_user = asyncio.Event()

    async def open_url(url: str) -> None:
        opened.append(url)

    def emit(state: protocol.LoginState) -> None:
        states.append(state)
        if state.state == "awaiting_user":
            awaiting_user.set()

    home = tmp_path / "home"
    # DISPLAY is only looked at (Gemini opens a browser only with one); the hook catches the opening.
    env = {"PATH": os.environ["PATH"], "DISPLAY": ":99", "LANG": "C.UTF-8"}
    runner = LoginRunner(provider, {}, home, env, open_url, emit, timeout_s=120)
    try:
        await runner.start()
        await asyncio.wait_for(awaiting_user.wait(), URL_WAIT_S)
    finally:
        await runner.stop()

    assert len(opened) == 1, opened
    url = opened[0]
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.netloc}{parts.path}" == endpoint
    assert parts.scheme == "https"
    assert query["client_id"] == [client_id]
    assert query["response_type"] == ["code"]
    redirect = urlsplit(query["redirect_uri"][0])
    assert (redirect.scheme, redirect.hostname, redirect.path) == ("http", callback_host, callback_path)
    if port is not None:
        assert redirect.port == port
    assert [s.state for s in states][:2] == ["starting", "awaiting_user"]
    assert states[1].url == url
    assert runner.state is not None and runner.state.state == "awaiting_user"
