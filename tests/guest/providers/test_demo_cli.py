"""The demo CLI on its own, against the demo OAuth server on a real port, with a scripted browser."""

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.demo.oauth_server import demo_oauth_server

EMAIL = "grace@example.com"
CLI = [sys.executable, "-m", "browservm.guest.providers.demo_cli"]

# $BROWSER for the test: a user who signs in at whatever page the CLI opens.
BROWSER_SCRIPT = f"""#!{sys.executable}
import asyncio, sys
sys.path.insert(0, {str(Path.cwd())!r})
from tests.demo.browser import sign_in
answer = asyncio.run(sign_in(sys.argv[1], {EMAIL!r}))
open(sys.argv[0] + ".log", "w").write(str(answer.status_code) + " " + answer.text)
"""


@pytest.fixture(scope="module")
def issuer() -> Iterator[str]:
    with demo_oauth_server() as url:
        yield url


def run(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args,
        env={**os.environ, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_login_through_the_browser_then_whoami_and_refresh(issuer: str, tmp_path: Path) -> None:
    browser = tmp_path / "browser"
    browser.write_text(BROWSER_SCRIPT)
    browser.chmod(0o755)
    home = tmp_path / "home"

    login = run(["login", "--issuer", issuer], home, BROWSER=str(browser))
    assert login.returncode == 0, login.stderr
    assert f"Open this URL to sign in: {issuer}/authorize?" in login.stdout
    assert login.stdout.strip().endswith(f"Signed in as {EMAIL}")
    assert (tmp_path / "browser.log").read_text().startswith("200 ")

    path = home / ".browservm-demo/credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = json.loads(path.read_text())
    assert first["account"]["email"] == EMAIL

    whoami = run(["whoami"], home)
    assert (whoami.returncode, whoami.stdout.strip()) == (0, EMAIL)
    refreshed = run(["whoami", "--refresh"], home)
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(path.read_text())["refresh_token"] != first["refresh_token"]

    # The old refresh token was single use: a stale copy cannot refresh any more.
    path.write_text(json.dumps(first))
    stale = run(["whoami", "--refresh"], home)
    assert stale.returncode == 1
    assert "already used" in stale.stderr


def test_whoami_without_credentials_exits_non_zero(tmp_path: Path) -> None:
    result = run(["whoami"], tmp_path)
    assert result.returncode == 1
    assert "not signed in" in result.stderr


def test_declined_confirmation_cancels(issuer: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "login", "--issuer", issuer, "--confirm"],
        env={**os.environ, "HOME": str(tmp_path)},
        input="n\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"Sign in to {issuer}? [Y/n]" in result.stdout
    assert "sign-in cancelled" in result.stderr
