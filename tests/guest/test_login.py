import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from browservm import protocol
from browservm.guest.login import LoginNotReady, LoginRunner, redact, terminal_text
from tests.demo.browser import sign_in
from tests.demo.oauth_server import demo_oauth_server

EMAIL = "ada@example.com"


@pytest.fixture(scope="module")
def issuer() -> Iterator[str]:
    with demo_oauth_server() as url:
        yield url


class Recorder:
    def __init__(self) -> None:
        self.states: list[protocol.LoginState] = []
        self.opened: list[str] = []

    def emit(self, state: protocol.LoginState) -> None:
        self.states.append(state)

    @property
    def names(self) -> list[str]:
        return [s.state for s in self.states]


def runner_for(
    home: Path, recorder: Recorder, open_url: object, options: dict[str, str], timeout_s: float = 30
) -> LoginRunner:
    return LoginRunner(
        "demo",
        options,
        home,
        {"PATH": os.environ["PATH"], "DISPLAY": ":99"},
        open_url,  # type: ignore[arg-type]
        recorder.emit,
        timeout_s,
    )


@pytest.fixture
async def cleanup() -> AsyncIterator[list[LoginRunner]]:
    runners: list[LoginRunner] = []
    yield runners
    for runner in runners:
        await runner.stop()


async def test_demo_login_end_to_end_hands_the_credentials_over(
    issuer: str, tmp_path: Path, cleanup: list[LoginRunner]
) -> None:
    home = tmp_path / "home"
    recorder = Recorder()

    async def user_signs_in(url: str) -> None:
        recorder.opened.append(url)
        callback = await sign_in(url, EMAIL)
        assert callback.status_code == 200, callback.text
        assert f"Signed in as {EMAIL}" in callback.text

    runner = runner_for(home, recorder, user_signs_in, {"issuer": issuer})
    cleanup.append(runner)
    await runner.start()
    final = await runner.wait()

    assert recorder.names == ["starting", "awaiting_user", "credentials_ready"], recorder.states
    assert recorder.states[1].url == recorder.opened[0]
    assert recorder.opened[0].startswith(f"{issuer}/authorize?")
    assert final.account["email"] == EMAIL
    assert final.account["issuer"] == issuer
    assert not any("demo-" in value and "t-" in value for value in final.account.values())

    blobs = await runner.collect()
    assert [b.path for b in blobs] == [".browservm-demo/credentials.json"]
    assert blobs[0].mode == 0o600
    credentials = json.loads(base64.b64decode(blobs[0].content_b64))
    assert credentials["account"]["email"] == EMAIL
    assert credentials["refresh_token"].startswith("demo-rt-")
    # The CLI that wrote them has stopped for good: only the CLI VM will use these tokens. Until the
    # browser sandbox is destroyed (once the controller has stored them), asking again gives the same.
    assert final.state == "credentials_ready" and runner.pid is not None
    assert not psutil.pid_exists(runner.pid), "the CLI still runs"
    assert await runner.collect() == blobs

    # Delivered into another home, the CLI is signed in there (and its refresh token works once).
    cli_home = tmp_path / "cli-home"
    target = cli_home / blobs[0].path
    target.parent.mkdir(parents=True)
    target.write_bytes(base64.b64decode(blobs[0].content_b64))
    target.chmod(blobs[0].mode)
    whoami = subprocess.run(
        [sys.executable, "-m", "browservm.guest.providers.demo_cli", "whoami", "--refresh"],
        env={**os.environ, "HOME": str(cli_home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() == EMAIL


async def test_cli_that_exits_early_fails_with_its_last_output(
    tmp_path: Path, cleanup: list[LoginRunner]
) -> None:
    recorder = Recorder()

    async def never(url: str) -> None:
        raise AssertionError("no URL should be opened")

    # "http://" passes the provider's check but the CLI refuses it and exits 1.
    runner = runner_for(tmp_path, recorder, never, {"issuer": "http://"})
    cleanup.append(runner)
    await runner.start()
    final = await runner.wait()
    assert recorder.names == ["starting", "failed"]
    assert "exited with status 1" in final.detail
    assert "--issuer must be an http(s) URL" in final.detail


async def test_nobody_signs_in_so_the_login_expires(
    issuer: str, tmp_path: Path, cleanup: list[LoginRunner]
) -> None:
    recorder = Recorder()

    async def user_walks_away(url: str) -> None:
        recorder.opened.append(url)

    # Long enough for the CLI to start and show its page on a loaded machine, so that it is the user's
    # absence that ends it.
    runner = runner_for(tmp_path, recorder, user_walks_away, {"issuer": issuer}, timeout_s=6)
    cleanup.append(runner)
    await runner.start()
    final = await runner.wait()
    assert recorder.names == ["starting", "awaiting_user", "expired"]
    assert "within 6 s" in final.detail
    assert runner.pid is not None
    with pytest.raises(ProcessLookupError):  # the CLI no longer runs
        os.kill(runner.pid, 0)
    with pytest.raises(LoginNotReady, match="expired"):
        await runner.collect()


async def test_a_sign_in_page_that_does_not_load_is_kept_and_tried_again(
    issuer: str, tmp_path: Path, cleanup: list[LoginRunner]
) -> None:
    """The page fails to load twice (the provider, or the way to it, is down for a moment): the URL is
    the session's from the first attempt, the user is told it is being tried again, and the sign-in
    goes on once it loads."""
    recorder = Recorder()
    attempts: list[str] = []

    async def flaky_browser(url: str) -> None:
        attempts.append(url)
        if len(attempts) <= 2:
            raise ConnectionError("net::ERR_NAME_NOT_RESOLVED")
        callback = await sign_in(url, EMAIL)
        assert callback.status_code == 200, callback.text

    runner = runner_for(tmp_path, recorder, flaky_browser, {"issuer": issuer})
    cleanup.append(runner)
    await runner.start()
    final = await runner.wait()
    assert recorder.names == ["starting", "awaiting_user", "awaiting_user", "credentials_ready"], (
        recorder.states
    )
    first = recorder.states[1]
    assert first.url == attempts[0] and "did not load" in first.detail and "trying again" in first.detail
    assert recorder.states[2].detail == "" and len(attempts) == 3
    assert final.account["email"] == EMAIL


async def test_a_page_that_never_loads_ends_with_the_sessions_time_not_before(
    issuer: str, tmp_path: Path, cleanup: list[LoginRunner]
) -> None:
    recorder = Recorder()

    async def broken_browser(url: str) -> None:
        raise ConnectionError("DevTools is not answering")

    runner = runner_for(tmp_path, recorder, broken_browser, {"issuer": issuer}, timeout_s=6)
    cleanup.append(runner)
    await runner.start()
    final = await runner.wait()
    assert recorder.names == ["starting", "awaiting_user", "expired"], recorder.states
    assert "DevTools is not answering" in recorder.states[1].detail
    assert "within 6 s" in final.detail


async def test_unknown_provider_names_the_known_ones(tmp_path: Path) -> None:
    runner = LoginRunner("dropbox", {}, tmp_path, {}, lambda url: None, lambda s: None, 10)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="unknown provider 'dropbox'; this guest knows claude_code, codex"):
        await runner.start()


async def test_demo_without_issuer_option_says_what_is_missing(tmp_path: Path) -> None:
    runner = LoginRunner("demo", {}, tmp_path, {}, lambda url: None, lambda s: None, 10)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="needs option 'issuer'"):
        await runner.start()


async def test_stop_is_idempotent_and_cleans_up(issuer: str, tmp_path: Path) -> None:
    recorder = Recorder()

    async def user_walks_away(url: str) -> None:
        recorder.opened.append(url)

    runner = runner_for(tmp_path, recorder, user_walks_away, {"issuer": issuer})
    await runner.start()
    hook_dir, pid = runner.hook.directory, runner.pid
    assert hook_dir is not None and stat.S_IMODE(hook_dir.stat().st_mode) == 0o700
    assert pid is not None
    await runner.stop()
    await runner.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the CLI is gone (and reaped)
    assert not hook_dir.exists()


def test_terminal_text_strips_escapes_and_keeps_hyperlink_targets() -> None:
    raw = (
        "\x1b[1mOpen\x1b[0m: \x1b]8;;https://claude.com/cai/oauth/authorize?a=1\x07"
        "\x1b[94mclick\x1b[39m\x1b]8;;\x07\r\nPaste code here if prompted > \x1b[?25l"
    )
    text, links = terminal_text(raw)
    assert text == "Open: click\nPaste code here if prompted > "
    assert links == ["https://claude.com/cai/oauth/authorize?a=1"]


def test_redact_hides_tokens_and_codes() -> None:
    line = "GET /callback?code=abc123&state=s token=ya29.secret eyJhbGc.eyJzdWIi.sig sk-ant-oat01-xyz"
    cleaned = redact(line)
    for secret in ("abc123", "ya29.secret", "eyJhbGc", "sk-ant-oat01-xyz"):
        assert secret not in cleaned
    assert "state=s" in cleaned
