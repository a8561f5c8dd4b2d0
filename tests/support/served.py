"""The controller as the README starts it: ``scripts/run.sh`` (set-up, the guest image, ``browservm
serve``) in a subprocess, with a state directory, port, network and TURN of its own in the test run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from browservm.settings import Settings
from tests.controller.conftest import free_port, free_subnet, remove_everything

ROOT = Path(__file__).resolve().parents[2]
START_S = 120


@dataclass
class Served:
    url: str
    key: str
    state_dir: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_sh(**settings: str) -> Iterator[Served]:
    """``scripts/run.sh`` with ``BROWSERVM_*`` ``settings`` on top of the test run's own; stopped (and
    everything it left removed) on exit."""
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-run-"))
    log = state_dir.parent / f"{state_dir.name}.log"
    port, turn_port = free_port(), free_port()
    env = {
        **os.environ,
        "BROWSERVM_STATE_DIR": str(state_dir),
        "BROWSERVM_PORT": str(port),
        "BROWSERVM_RUN_COTURN": "true",
        "BROWSERVM_TURN_SECRET": secrets.token_urlsafe(16),
        "BROWSERVM_TURN_URLS": json.dumps([f"turn:127.0.0.1:{turn_port}?transport=udp"]),
        "BROWSERVM_SANDBOX_SUBNET": free_subnet(),
        "BROWSERVM_DEMO_OAUTH_PORT": str(free_port()),
        "BROWSERVM_GUEST_DNS": "[]",
        **{f"BROWSERVM_{name.upper()}": value for name, value in settings.items()},
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "run.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        yield Served(url, _wait_for_start(process, log, url), state_dir, log, env)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        asyncio.run(
            remove_everything(Settings(state_dir=state_dir, sandbox_subnet=env["BROWSERVM_SANDBOX_SUBNET"]))
        )
        subprocess.run(["rm", "-rf", str(state_dir)], check=False)
        log.unlink(missing_ok=True)


def _wait_for_start(process: subprocess.Popen[bytes], log: Path, url: str) -> str:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"scripts/run.sh exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        found = re.search(r"Operator API key \(shown once, keep it\): (\S+)", log.read_text())
        if found:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the controller did not come up:\n{log.read_text()[-3000:]}")
