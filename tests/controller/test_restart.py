"""A controller killed with SIGKILL and started again still knows every session and adopts live sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
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
from sqlalchemy import update

from browservm.sandbox.image import ImageStore
from browservm.settings import Settings
from browservm.store.database import Database
from browservm.store.models import Sandbox
from browservm.store.models import Session as SessionRow
from browservm_client import Client
from tests.controller.conftest import free_port, free_subnet, remove_everything
from tests.controller.demo_login import WHOAMI, fill_in_login
from tests.demo.oauth_server import demo_oauth_server
from tests.support.qemu import qemu_processes
from tests.support.warm_pool import sandboxes_in, wait_warm

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
        "BROWSERVM_SANDBOX_SUBNET": free_subnet(),
        "BROWSERVM_DEMO_OAUTH_PORT": str(free_port()),
        "BROWSERVM_GUEST_DNS": "[]",
        "BROWSERVM_DEVTOOLS_DEBUG_PORT": "true",  # tests sign in by typing into the sandbox's page
    }
    process = ServeProcess(env, tmp_path / "controller.log")
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            process.terminate()
        backend = env.get("BROWSERVM_BACKEND", "process")  # a test may have made it qemu
        asyncio.run(
            remove_everything(
                Settings(state_dir=state_dir, sandbox_subnet=env["BROWSERVM_SANDBOX_SUBNET"], backend=backend)
            )
        )


async def runtime_of(database_url: str, sandbox_id: str) -> dict[str, Any]:
    """What the controller stored about a sandbox's processes (the backend's runtime record)."""
    db = Database(database_url)
    try:
        async with db.session() as s:
            record = await s.get(Sandbox, sandbox_id)
            assert record is not None
            return dict(record.runtime)
    finally:
        await db.close()


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


@pytest.mark.slow
def test_kill_9_keeps_sessions_and_adopts_the_live_sandbox(serve: ServeProcess) -> None:
    key = _key(serve.env)
    serve.start()
    client = Client(key, base_url=serve.url, timeout=10)
    adopted = client.sessions.create(user_id="alice", provider="demo")
    doomed = client.sessions.create(user_id="bob", provider="demo")
    client.sessions.wait(adopted.id, "awaiting_user", timeout=60)
    client.sessions.wait(doomed.id, "awaiting_user", timeout=60)
    before = {s.id for s in client.sessions.list()}
    adopted_sandbox = _sandbox_of(serve, adopted.id)
    (warm,) = asyncio.run(wait_warm(serve.env["BROWSERVM_DATABASE_URL"]))  # the default pool of one

    serve.kill9()
    # A double fault: the adopted sandbox's bubblewrap monitor is killed too, its agent runs on.
    monitor = asyncio.run(runtime_of(serve.env["BROWSERVM_DATABASE_URL"], adopted_sandbox))["pid"]
    os.kill(monitor, signal.SIGKILL)
    # One sandbox dies with the controller down; the other keeps running.
    db_sandbox = _sandbox_of(serve, doomed.id)
    for proc in _sandbox_processes(db_sandbox):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert _sandbox_processes(_sandbox_of(serve, adopted.id)), "sandbox should outlive the controller"

    serve.start()
    assert {s.id for s in client.sessions.list()} == before
    # The killed controller's warm sandbox belongs to no session: destroyed, and the pool boots a new one.
    assert not _sandbox_processes(warm)
    assert warm in asyncio.run(sandboxes_in(serve.env["BROWSERVM_DATABASE_URL"], "destroyed"))
    (rewarmed,) = asyncio.run(wait_warm(serve.env["BROWSERVM_DATABASE_URL"]))
    assert rewarmed != warm
    failed = client.sessions.wait(doomed.id, "failed", timeout=60)
    assert "gone" in failed.reason
    alive = client.sessions.get(adopted.id)
    assert alive.status in ("starting", "awaiting_user")
    # Adopted, not replaced: the same sandbox still runs and the session still moves on it.
    assert _sandbox_of(serve, adopted.id) == adopted_sandbox
    assert _sandbox_processes(adopted_sandbox)
    assert client.sessions.cancel(adopted.id).status == "cancelled"
    deadline = time.monotonic() + 20
    while _sandbox_processes(_sandbox_of(serve, adopted.id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _sandbox_processes(_sandbox_of(serve, adopted.id))
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


async def force_status(database_url: str, session_id: str, status: str) -> None:
    """Where a controller killed at that moment leaves a session (its transition written, nothing after)."""
    db = Database(database_url)
    try:
        async with db.session() as s:
            await s.execute(update(SessionRow).where(SessionRow.id == session_id).values(status=status))
    finally:
        await db.close()


def _wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.slow
def test_a_controller_killed_while_capturing_loses_no_sign_in(serve: ServeProcess) -> None:
    """Killed after the session moved to ``capturing`` and before the credentials were stored: the next
    controller collects them again from the sandbox, stores and delivers them, and completes."""
    # A sign-in server of its own, on a host port guests may reach: the controller's dies with it.
    issuer_port = free_port()
    serve.env["BROWSERVM_GUEST_HOST_PORTS"] = json.dumps([f"tcp/{issuer_port}"])
    key = _key(serve.env)
    serve.start()
    gateway = str(ipaddress.IPv4Network(serve.env["BROWSERVM_SANDBOX_SUBNET"]).network_address + 1)
    with demo_oauth_server(host=gateway, port=issuer_port) as issuer:
        _sign_in_across_a_crash_in_capturing(serve, key, issuer)


def _sign_in_across_a_crash_in_capturing(serve: ServeProcess, key: str, issuer: str) -> None:
    client = Client(key, base_url=serve.url, timeout=10)
    session = client.sessions.create(user_id="carol", provider="demo", options={"issuer": issuer})
    sandbox_id = client.sessions.wait(session.id, "awaiting_user", timeout=60).sandbox_id
    assert sandbox_id is not None
    serve.kill9()

    # The user finishes signing in (the sandbox's CLI gets its tokens all the same)...
    state_dir = Path(serve.env["BROWSERVM_STATE_DIR"])
    asyncio.run(fill_in_login(state_dir, sandbox_id, "carol@example.test"))
    written = state_dir / "sandboxes" / sandbox_id / "home" / ".browservm-demo" / "credentials.json"
    _wait_for(written.exists, 30, "the CLI in the sandbox never wrote its credentials")
    # ...and the controller had seen it and moved the session to capturing just before it died.
    asyncio.run(force_status(serve.env["BROWSERVM_DATABASE_URL"], session.id, "capturing"))

    serve.start()
    done = client.sessions.wait(session.id, "completed", "failed", timeout=60)
    assert done.status == "completed", done.reason
    (stored,) = client.credentials.list("carol")
    assert stored.session_id == session.id and stored.account["email"] == "carol@example.test"
    client.cli_vms.create("carol")
    result = client.cli_vms.exec("carol", WHOAMI)
    assert result.exit_code == 0 and "carol@example.test" in result.stdout
    _wait_for(lambda: not _sandbox_processes(sandbox_id), 20, "the browser sandbox outlived its session")
    client.cli_vms.delete("carol")


@pytest.mark.slow
def test_a_sign_in_lost_with_its_sandbox_before_it_was_stored_says_so(serve: ServeProcess) -> None:
    key = _key(serve.env)
    serve.start()
    client = Client(key, base_url=serve.url, timeout=10)
    session = client.sessions.create(user_id="dave", provider="demo")
    sandbox_id = client.sessions.wait(session.id, "awaiting_user", timeout=60).sandbox_id
    assert sandbox_id is not None
    serve.kill9()
    for proc in _sandbox_processes(sandbox_id):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    asyncio.run(force_status(serve.env["BROWSERVM_DATABASE_URL"], session.id, "capturing"))

    serve.start()
    ended = client.sessions.wait(session.id, "completed", "failed", timeout=60)
    assert ended.status == "failed"
    assert "gone before the sign-in was stored" in ended.reason, ended.reason


@pytest.mark.slow
def test_a_cli_vm_outlives_a_restart_and_ends_itself_when_no_controller_comes(serve: ServeProcess) -> None:
    """A stopped controller leaves its sandboxes for the guests' idle timeout: a controller that starts
    again in time holds on to them (a CLI VM keeps its user's work); with none, they end themselves."""
    serve.env["BROWSERVM_GUEST_IDLE_TIMEOUT_S"] = "6"
    key = _key(serve.env)
    serve.start()
    client = Client(key, base_url=serve.url, timeout=10)
    vm = client.cli_vms.create("erin")
    serve.kill9()
    serve.start()
    started = time.monotonic()
    # Past the idle timeout: only a controller that reconnected keeps it alive.
    _wait_for(lambda: time.monotonic() - started > 9, 15, "time")
    assert _sandbox_processes(vm.sandbox_id), "the restarted controller should have kept the CLI VM"
    assert client.cli_vms.exec("erin", ["true"]).exit_code == 0

    assert serve.terminate() in (0, -signal.SIGTERM)
    _wait_for(lambda: not _sandbox_processes(vm.sandbox_id), 20, "the CLI VM outlived its idle timeout")


def _qemu_vms(state_dir: Path) -> set[str]:
    """The sandboxes whose QEMU runs (by its working directory, the VM's)."""
    return {Path(process.info["cwd"]).name for process in qemu_processes(state_dir)}


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_kill_9_with_qemu_vms_adopts_the_cli_vm_and_removes_the_rest(serve: ServeProcess) -> None:
    """A killed controller's QEMU VMs: the CLI VM is adopted with its files; the warm VM, its directory,
    TAP and namespace, and the pool's snapshot are removed."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if not serve.env["BROWSERVM_DATABASE_URL"].startswith("sqlite"):
        pytest.skip("one database is enough: the VMs are the subject (the store's part runs on both above)")
    image = ImageStore(Path(os.environ["BROWSERVM_IMAGE_DIR"])).current("browser")
    assert image is not None, "no browser image: scripts/test.sh builds it"
    serve.env.update(
        BROWSERVM_BACKEND="qemu",
        BROWSERVM_VM_KERNEL=str(image.vmlinux),
        BROWSERVM_VM_ROOTFS=str(image.rootfs),
        BROWSERVM_VM_INITRD=str(image.initramfs),
        BROWSERVM_CLI_MEMORY_MIB="512",
        BROWSERVM_WARM_POOL_SIZE="1",
        BROWSERVM_MAX_SANDBOXES="3",
        BROWSERVM_SANDBOX_BOOT_TIMEOUT_S="900",
        BROWSERVM_DEVTOOLS_DEBUG_PORT="false",
    )
    state_dir, database_url = Path(serve.env["BROWSERVM_STATE_DIR"]), serve.env["BROWSERVM_DATABASE_URL"]
    snapshots = state_dir / "qemu-snapshots"
    key = _key(serve.env)
    serve.start()
    client = Client(key, base_url=serve.url, timeout=900)
    cli_vm = client.cli_vms.create("alice").sandbox_id
    assert client.cli_vms.exec("alice", ["sh", "-c", "echo kept > note.txt"]).exit_code == 0
    (warm,) = asyncio.run(wait_warm(database_url, timeout_s=900))
    saved = set(os.listdir(snapshots))
    assert saved, "the pool's warm VM was restored from a snapshot"
    assert _qemu_vms(state_dir) == {cli_vm, warm}

    serve.kill9()
    assert _qemu_vms(state_dir) == {cli_vm, warm}, "the VMs outlive their controller"
    serve.start()

    # The CLI VM is adopted, not replaced: the same VM, with the file written before the kill.
    assert client.cli_vms.get("alice").sandbox_id == cli_vm
    kept = client.cli_vms.exec("alice", ["cat", "note.txt"])
    assert (kept.exit_code, "".join(chunk.data for chunk in kept.output)) == (0, "kept\n")
    # The warm VM belonged to no session: destroyed with all it held, and its snapshot pruned.
    assert warm in asyncio.run(sandboxes_in(database_url, "destroyed"))
    assert warm not in _qemu_vms(state_dir)
    assert not (state_dir / "qemu" / warm).exists()
    assert warm not in _netns()
    # The new pool prunes what the last one saved before it boots the VM it will save (not waited for:
    # booting and preparing a browser VM under TCG is a minute; the shutdown below ends it).
    _wait_for(lambda: saved.isdisjoint(os.listdir(snapshots)), 30, "the killed controller's snapshot is gone")
    assert cli_vm in _qemu_vms(state_dir)

    client.cli_vms.delete("alice")
    assert serve.terminate() in (0, -signal.SIGTERM)
    assert _qemu_vms(state_dir) == set(), "the warm VM goes at shutdown, the CLI VM at delete"
    assert cli_vm not in _netns()
