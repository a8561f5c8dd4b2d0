"""examples/quickstart.py against a controller served as scripts/run.sh serves it, signed in like a user."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from browservm.settings import Settings
from browservm_client import AsyncClient
from tests.controller.conftest import free_port, free_subnet, remove_everything
from tests.controller.demo_login import fill_in_login

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "browservm"


@dataclass
class Served:
    url: str
    key: str
    state_dir: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``browservm serve`` with run.sh's defaults (SQLite in the state dir, the process backend, a warm
    pool of one), on a free port; DevTools on loopback so the test can type into the sign-in page."""
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-"))  # short: unix socket paths are limited
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROWSERVM_")}
    env |= {
        "BROWSERVM_STATE_DIR": str(state_dir),
        "BROWSERVM_PORT": str(port),
        "BROWSERVM_DEVTOOLS_DEBUG_PORT": "true",
        # What scripts/run.sh would have built, and a network and demo port of its own in the test run.
        "BROWSERVM_IMAGE_DIR": os.environ["BROWSERVM_IMAGE_DIR"],
        "BROWSERVM_SANDBOX_SUBNET": free_subnet(),
        "BROWSERVM_DEMO_OAUTH_PORT": str(free_port()),
        "BROWSERVM_GUEST_DNS": "[]",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        key = None
        while time.monotonic() < deadline and key is None:
            assert process.poll() is None, log.read_text()[-3000:]
            found = re.search(r"Operator API key \(shown once, keep it\): (\S+)", log.read_text())
            try:
                if found and httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    key = found[1]
            except httpx.HTTPError:
                time.sleep(0.1)
        assert key, "controller did not start:\n" + log.read_text()[-3000:]
        yield Served(url=url, key=key, state_dir=state_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        # The CLI VM outlives the controller by design.
        asyncio.run(
            remove_everything(Settings(state_dir=state_dir, sandbox_subnet=env["BROWSERVM_SANDBOX_SUBNET"]))
        )


async def _run_and_sign_in(served: Served, script: Path, user_id: str, *args: str) -> str:
    """Run ``script`` as a newcomer would, sign in when it shows a viewer link, and return its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROWSERVM_")}
    env |= {"BROWSERVM_URL": served.url, "BROWSERVM_API_KEY": served.key}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    printed = b""
    while (found := re.search(rb"/view/(ses_\w+)\?token=", printed)) is None:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        assert line, printed.decode()
        printed += line
    # What the newcomer does in the viewer: type an email and the demo password into the sign-in page.
    async with AsyncClient(served.key, base_url=served.url) as api:
        waiting = await api.sessions.wait(found[1].decode(), "awaiting_user", timeout=60)
        assert waiting.sandbox_id
        await fill_in_login(served.state_dir, waiting.sandbox_id, f"{user_id}@example.com")
    rest, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    output = (printed + rest).decode()
    assert process.returncode == 0, output
    return output


async def test_quickstart_signs_in_and_shows_the_delivered_credentials(served: Served) -> None:
    output = await _run_and_sign_in(served, ROOT / "examples" / "quickstart.py", "newcomer", "newcomer")
    async with AsyncClient(served.key, base_url=served.url) as api:
        vm = await api.cli_vms.get("newcomer")

    assert "Signed in as newcomer@example.com" in output
    delivered = (
        served.state_dir / "sandboxes" / vm.sandbox_id / "home" / ".browservm-demo" / "credentials.json"
    )
    assert "/.browservm-demo/credentials.json  mode 600" in output  # its path inside the CLI VM
    assert "newcomer@example.com" in output.split("In the CLI VM of newcomer:")[1]
    # The file's tokens stay in the CLI VM: the example prints their length, never them.
    tokens = json.loads(delivered.read_text())
    assert f"access_token: <{len(tokens['access_token'])} characters>" in output
    assert tokens["access_token"] not in output and tokens["refresh_token"] not in output


async def test_the_readmes_ten_lines_work_as_shown(served: Served, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 10
    script = tmp_path / "readme.py"
    script.write_text(snippet)
    output = await _run_and_sign_in(served, script, "alice")
    assert "Signed in as alice@example.com" in output
    assert "credentials.json" in output and "exit code 0" in output
