"""A controller killed with SIGKILL and started again still knows every session and adopts live sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from browservm.sandbox.base import SandboxHandle
from browservm.sandbox.process import ProcessBackend
from tests.controller.conftest import free_port
from tests.controller.test_warm_pool import sandboxes_in, wait_warm

BIN = Path(sys.executable).parent / "browservm"


class ServeProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{env['BROWSERVM_PORT']}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([str(BIN), "serve"], env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("controller did not start:\n" + self.log.read_text()[-3000:])

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def serve(tmp_path: Path, database_url: str) -> Iterator[ServeProcess]:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-"))
    env = {
        **os.environ,
        # Short on purpose: unix socket paths are limited to 107 bytes.
        "BROWSERVM_STATE_DIR": str(state_dir),
        "BROWSERVM_DATABASE_URL": database_url,
        "BROWSERVM_PORT": str(free_port()),
        "BROWSERVM_RECONCILE_INTERVAL_S": "1",
        "BROWSERVM_LOG_LEVEL": "info",
    }
    process = ServeProcess(env, tmp_path / "controller.log")
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            process.terminate()
        backend = ProcessBackend(state_dir)
        for orphan in asyncio.run(backend.list_orphans([])):
            asyncio.run(backend.destroy(SandboxHandle(orphan, backend.name, "browser", {})))
        shutil.rmtree(state_dir, ignore_errors=True)


def _key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(BIN), "keys", "create", "--name", "test"], env=env, capture_output=True, check=True
    )
    return out.stdout.decode().strip()


def _sandbox_processes(sandbox_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(sandbox_id in part for part in (proc.info["cmdline"] or [])):
            found.append(proc)
    return found


def _wait(client: httpx.Client, session_id: str, *wanted: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/v1/sessions/{session_id}").json()
        if body["status"] in wanted:
            return body
        time.sleep(0.2)
    raise AssertionError(f"never {wanted}: {body}")


@pytest.mark.slow
def test_kill_9_keeps_sessions_and_adopts_the_live_sandbox(serve: ServeProcess) -> None:
    key = _key(serve.env)
    serve.start()
    client = httpx.Client(base_url=serve.url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    adopted = client.post("/v1/sessions", json={"user_id": "alice", "provider": "demo"}).json()
    doomed = client.post("/v1/sessions", json={"user_id": "bob", "provider": "demo"}).json()
    _wait(client, adopted["id"], "starting", "awaiting_user")
    _wait(client, doomed["id"], "starting", "awaiting_user")
    before = {s["id"]: s for s in client.get("/v1/sessions").json()["data"]}
    adopted_sandbox = _sandbox_of(serve, adopted["id"])
    (warm,) = asyncio.run(wait_warm(serve.env["BROWSERVM_DATABASE_URL"]))  # the default pool of one

    serve.kill9()
    # One sandbox dies with the controller down; the other keeps running.
    db_sandbox = _sandbox_of(serve, doomed["id"])
    for proc in _sandbox_processes(db_sandbox):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert _sandbox_processes(_sandbox_of(serve, adopted["id"])), "sandbox should outlive the controller"

    serve.start()
    after = {s["id"]: s for s in client.get("/v1/sessions").json()["data"]}
    assert set(after) == set(before)
    # The killed controller's warm sandbox belongs to no session: destroyed, and the pool boots a new one.
    assert not _sandbox_processes(warm)
    assert warm in asyncio.run(sandboxes_in(serve.env["BROWSERVM_DATABASE_URL"], "destroyed"))
    (rewarmed,) = asyncio.run(wait_warm(serve.env["BROWSERVM_DATABASE_URL"]))
    assert rewarmed != warm
    failed = _wait(client, doomed["id"], "failed")
    assert "gone" in failed["reason"]
    alive = client.get(f"/v1/sessions/{adopted['id']}").json()
    assert alive["status"] in ("starting", "awaiting_user")
    # Adopted, not replaced: the same sandbox still runs and the session still moves on it.
    assert _sandbox_of(serve, adopted["id"]) == adopted_sandbox
    assert _sandbox_processes(adopted_sandbox)
    assert client.post(f"/v1/sessions/{adopted['id']}/cancel").json()["status"] == "cancelled"
    deadline = time.monotonic() + 20
    while _sandbox_processes(_sandbox_of(serve, adopted["id"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _sandbox_processes(_sandbox_of(serve, adopted["id"]))
    # Graceful on SIGTERM: the lifespan shuts down (uvicorn then re-raises the signal, as systemd expects).
    assert serve.terminate() in (0, -signal.SIGTERM)
    assert "controller.stopped" in serve.log.read_text()


def _sandbox_of(serve: ServeProcess, session_id: str) -> str:
    out = subprocess.run(
        [str(BIN), "sessions", "show", session_id], env=serve.env, capture_output=True, check=True
    ).stdout
    sandbox_id = json.loads(out)["sandbox_id"]
    assert sandbox_id, f"session {session_id} has no sandbox yet"
    return str(sandbox_id)
