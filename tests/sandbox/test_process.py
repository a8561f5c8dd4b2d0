"""The process backend with real agents: bubblewrap, Xvfb, Chromium and x11vnc as a user gets them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import BaseModel

from browservm import protocol
from browservm.sandbox.base import Liveness, SandboxError, SandboxHandle, SandboxSpec
from browservm.sandbox.channel import AgentError, Channel
from browservm.sandbox.process import MARKER_ENV, ProcessBackend

BOOT_S = 20.0
DEBUG_PORT = {"BROWSERVM_DEVTOOLS_PORT": "1"}
"""Service environment that opens a DevTools port beside the agent's pipe, so a test can watch the page."""


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short on purpose: the channel socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="bvm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def backend(state_dir: Path) -> AsyncIterator[ProcessBackend]:
    backend = ProcessBackend(state_dir)
    yield backend
    # Whatever a test left running goes, found the way the reconciler would find it.
    for sandbox_id in await backend.list_orphans([]):
        directory = str(state_dir / "sandboxes" / sandbox_id)
        await backend.destroy(SandboxHandle(sandbox_id, "process", "cli", {"dir": directory, "pid": None}))
    await backend.close()


@pytest.fixture
def web_pages(tmp_path: Path) -> Iterator[str]:
    """A local site with two pages, as the 'start_url' a session opens."""
    (tmp_path / "start.html").write_text("<title>start page</title><h1>hello from the test</h1>")
    (tmp_path / "next.html").write_text("<title>next page</title><h1>second</h1>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sandbox_processes(handle: SandboxHandle) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER_ENV) == handle.runtime["dir"]:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def host_pid(handle: SandboxHandle, sandbox_pid: int) -> int:
    """The host's pid of a sandbox process the agent reports by its pid inside the sandbox.

    Under bubblewrap the agent lives in its own PID namespace, so its pids mean nothing out here;
    ``NSpid`` in /proc lists a process's pid in each namespace, innermost last.
    """
    if not handle.runtime["bwrap"]:
        return sandbox_pid
    for process in sandbox_processes(handle):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("NSpid:") and int(line.split()[-1]) == sandbox_pid and len(line.split()) > 2:
                return process.pid
    raise AssertionError(f"no process of sandbox {handle.sandbox_id} has pid {sandbox_pid} inside it")


async def wait_state(
    events: asyncio.Queue[BaseModel | None], service: str, state: str, seen: list[protocol.ServiceState]
) -> protocol.ServiceState:
    async with asyncio.timeout(BOOT_S):
        while True:
            event = await events.get()
            assert event is not None, "channel closed"
            if isinstance(event, protocol.ServiceState):
                seen.append(event)
                if event.service == service and event.state == state:
                    return event


async def page_url(devtools_port: int) -> str:
    async with httpx.AsyncClient() as client:
        targets = (await client.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
    return str(next(t["url"] for t in targets if t["type"] == "page"))


async def eventually_page_url(channel: Channel, expected: str) -> None:
    async with asyncio.timeout(10):
        while True:
            status = await channel.request(protocol.Status(id=channel.next_id()))
            if status["devtools_port"] and await page_url(status["devtools_port"]) == expected:
                return
            await asyncio.sleep(0.1)


@pytest.mark.browser
async def test_browser_sandbox_shows_the_page_survives_a_chromium_crash_and_is_destroyed(
    backend: ProcessBackend, web_pages: str
) -> None:
    handle = await backend.create(SandboxSpec(sandbox_id="br1", role="browser"))
    assert handle.runtime["bwrap"] is backend.bwrap_usable()
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    seen: list[protocol.ServiceState] = []
    try:
        async with channel.subscribe() as events:
            start_url = f"{web_pages}/start.html"
            configure = protocol.Configure(
                id=channel.next_id(),
                session_id="s1",
                start_url=start_url,
                screen=protocol.ScreenConfig(width=800, height=600, fps=5),
                env=DEBUG_PORT,  # the test watches the page through it; the agent uses its pipe
            )
            result = await channel.request(configure)
            assert {"xvfb", "chromium", "vnc"} <= set(result["services"])
            await wait_state(events, "xvfb", "ready", seen)
            await wait_state(events, "chromium", "ready", seen)
            status = await channel.request(protocol.Status(id=channel.next_id()))
            assert status["display"].startswith(":")
            await eventually_page_url(channel, start_url)

            # The user (or the login) moves on; a crash later must come back on *that* page.
            next_url = f"{web_pages}/next.html"
            await channel.request(protocol.OpenUrl(id=channel.next_id(), url=next_url))
            await eventually_page_url(channel, next_url)

            # VNC fallback: the RFB banner arrives through the channel.
            if not any(s.service == "vnc" and s.state == "ready" for s in seen):
                await wait_state(events, "vnc", "ready", seen)
            stream = await channel.open_stream("vnc")
            async with asyncio.timeout(5):
                banner = await stream.read()
            assert banner is not None
            assert banner.startswith(b"RFB 003.00")
            # Both ways: our version goes in, x11vnc's security types (just "None": -nopw) come out.
            await stream.write(b"RFB 003.008\n")
            async with asyncio.timeout(5):
                security = await stream.read()
            assert security == b"\x01\x01"
            await stream.close()

            # Signaling is relayed to the streamer and its answer mapped back to this request.
            if not any(s.service == "streamer" and s.state == "ready" for s in seen):
                await wait_state(events, "streamer", "ready", seen)
            with pytest.raises(AgentError) as refused:
                await channel.request(protocol.Signal(id=channel.next_id(), peer_id="viewer-1", kind="offer"))
            assert refused.value.code == "bad_request"
            assert "sdp" in refused.value.message

            before = await channel.request(protocol.Status(id=channel.next_id()))
            assert before["services"]["chromium"]["restarts"] == 0, before["services"]["chromium"]
            seen.clear()
            os.kill(host_pid(handle, before["pids"]["chromium"]), signal.SIGKILL)
            restarting = await wait_state(events, "chromium", "restarting", seen)
            assert restarting.restarts == 1
            await wait_state(events, "chromium", "ready", seen)
            touched = [s for s in seen if s.service in ("xvfb", "vnc")]
            assert touched == [], f"other services were touched: {touched}"
            after = await channel.request(protocol.Status(id=channel.next_id()))
            assert after["pids"]["xvfb"] == before["pids"]["xvfb"]
            assert after["pids"]["vnc"] == before["pids"]["vnc"]
            assert after["services"]["chromium"]["restarts"] == 1
            await eventually_page_url(channel, next_url)
    finally:
        await channel.close()

    # A controller restart: a handle rebuilt from the stored runtime alone can probe and destroy.
    adopted = SandboxHandle(handle.sandbox_id, "process", "browser", dict(handle.runtime))
    assert await backend.probe(adopted) == Liveness.ALIVE
    assert sandbox_processes(adopted), "the sandbox's processes carry its marker"
    await backend.destroy(adopted)
    assert sandbox_processes(adopted) == []
    assert not Path(handle.runtime["dir"]).exists()
    assert await backend.probe(handle) == Liveness.GONE
    await backend.destroy(handle)  # idempotent


async def test_cli_sandbox_outlives_its_controller_and_is_adopted(backend: ProcessBackend) -> None:
    handle = await backend.create(SandboxSpec(sandbox_id="cli1", role="cli", env={"EXTRA": "yes"}))
    first = await backend.connect(handle, timeout_s=BOOT_S)
    assert first.hello.role == "cli"
    await first.request(
        protocol.WriteFiles(
            id=first.next_id(), files=[protocol.FileBlob(path="note.txt", content_b64="aGk=")]
        )
    )
    first._writer.transport.abort()  # the controller dies mid-connection
    await first.close()

    adopted = SandboxHandle("cli1", "process", "cli", dict(handle.runtime))
    assert await backend.probe(adopted) == Liveness.ALIVE
    second = await backend.connect(adopted, timeout_s=BOOT_S)
    try:
        async with second.subscribe() as events:
            exec_id = (
                await second.request(
                    protocol.Exec(id=second.next_id(), argv=["sh", "-c", 'cat note.txt; echo " $EXTRA"'])
                )
            )["exec_id"]
            output = b""
            async with asyncio.timeout(10):
                while not isinstance(event := await events.get(), protocol.ExecExit):
                    if isinstance(event, protocol.ExecOutput) and event.exec_id == exec_id:
                        import base64

                        output += base64.b64decode(event.data_b64)
        assert output == b"hi yes\n"
    finally:
        await second.close()
    await backend.destroy(adopted)
    assert await backend.probe(handle) == Liveness.GONE


async def test_hibernate_keeps_home_and_resume_runs_again(backend: ProcessBackend) -> None:
    handle = await backend.create(SandboxSpec(sandbox_id="cli2", role="cli"))
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    await channel.request(
        protocol.WriteFiles(
            id=channel.next_id(), files=[protocol.FileBlob(path=".codex/auth.json", content_b64="e30=")]
        )
    )
    await channel.close()
    hibernated = await backend.hibernate(handle)
    assert await backend.probe(hibernated) == Liveness.HIBERNATED
    assert await backend.probe(handle) == Liveness.HIBERNATED, "the old pid is gone, the marker stays"
    assert sandbox_processes(handle) == []
    resumed = await backend.resume(hibernated)
    assert await backend.probe(resumed) == Liveness.ALIVE
    assert resumed.runtime["pid"] != handle.runtime["pid"]
    channel = await backend.connect(resumed, timeout_s=BOOT_S)
    await channel.close()
    assert (Path(resumed.runtime["dir"]) / "home" / ".codex" / "auth.json").read_text() == "{}"
    await backend.destroy(resumed)


async def test_orphans_are_sandboxes_nobody_knows(backend: ProcessBackend) -> None:
    known = await backend.create(SandboxSpec(sandbox_id="known", role="cli"))
    stray = await backend.create(SandboxSpec(sandbox_id="stray", role="cli"))
    assert await backend.list_orphans(["known"]) == ["stray"]
    await backend.destroy(stray)
    await backend.destroy(known)
    assert await backend.list_orphans([]) == []


async def test_an_agent_that_cannot_start_fails_fast_with_its_log(state_dir: Path) -> None:
    backend = ProcessBackend(state_dir, python="/bin/false")
    handle = await backend.create(SandboxSpec(sandbox_id="broken", role="cli"))
    started = asyncio.get_running_loop().time()
    with pytest.raises(SandboxError) as failed:
        await backend.connect(handle, timeout_s=BOOT_S)
    assert asyncio.get_running_loop().time() - started < 5, "noticed the exit, not the timeout"
    assert "not running" in str(failed.value)
    await backend.destroy(handle)
    assert not (state_dir / "sandboxes" / "broken").exists()


async def test_readiness_reports_what_this_host_can_run(backend: ProcessBackend) -> None:
    readiness = await backend.readiness()
    assert readiness.ready, readiness.detail
    assert ("bubblewrap" in readiness.detail) is backend.bwrap_usable()


async def evaluate_in_page(devtools_port: int, expression: str) -> object:
    """Run JavaScript in the sandbox's page, as the user's clicks and typing would act on it."""
    import json

    import websockets.asyncio.client

    async with httpx.AsyncClient() as client:
        targets = (await client.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
    page = next(t for t in targets if t["type"] == "page")
    async with websockets.asyncio.client.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
        await ws.send(
            json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
        )
        while True:
            message = json.loads(await ws.recv())
            if message.get("id") == 1:
                return message["result"]["result"].get("value")


@pytest.mark.browser
async def test_demo_login_through_the_sandbox_browser_delivers_credentials(backend: ProcessBackend) -> None:
    from tests.demo.oauth_server import demo_oauth_server

    handle = await backend.create(SandboxSpec(sandbox_id="login1", role="browser"))
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    try:
        with demo_oauth_server() as issuer:
            async with channel.subscribe() as events:
                await channel.request(
                    protocol.Configure(
                        id=channel.next_id(),
                        session_id="s-login",
                        provider="demo",
                        provider_options={"issuer": issuer},
                        screen=protocol.ScreenConfig(width=800, height=600, fps=5),
                        env=DEBUG_PORT,
                    )
                )
                async with asyncio.timeout(BOOT_S):
                    while True:
                        event = await events.get()
                        assert event is not None
                        if isinstance(event, protocol.LoginState):
                            assert event.state != "failed", event.detail
                            if event.state == "awaiting_user":
                                break
                assert event.url is not None
                assert event.url.startswith(f"{issuer}/authorize?")
                await eventually_page_url(channel, event.url)

                # The user signs in on the page the sandbox's Chromium shows.
                status = await channel.request(protocol.Status(id=channel.next_id()))
                submitted = await evaluate_in_page(
                    status["devtools_port"],
                    "document.getElementById('email').value = 'ada@example.com';"
                    "document.getElementById('password').value = 'demo';"
                    "document.querySelector('form').submit(); 'sent'",
                )
                assert submitted == "sent"
                async with asyncio.timeout(BOOT_S):
                    while True:
                        event = await events.get()
                        assert event is not None
                        if isinstance(event, protocol.LoginState) and event.state != "awaiting_user":
                            break
                assert event.state == "credentials_ready", event.detail
                assert event.account.get("email") == "ada@example.com"

            result = await channel.request(protocol.CollectCredentials(id=channel.next_id()))
            files = [protocol.FileBlob(**blob) for blob in result["files"]]
            assert [blob.path for blob in files] == [".browservm-demo/credentials.json"]
            assert files[0].mode == 0o600
    finally:
        await channel.close()
        await backend.destroy(handle)


async def shell(channel: Channel, script: str) -> str:
    """Run ``script`` in a CLI sandbox; its stdout and stderr together."""
    import base64

    async with channel.subscribe() as events:
        request = protocol.Exec(id=channel.next_id(), argv=["sh", "-c", script + " 2>&1"])
        exec_id = (await channel.request(request))["exec_id"]
        output = b""
        async with asyncio.timeout(10):
            while not isinstance(event := await events.get(), protocol.ExecExit):
                if isinstance(event, protocol.ExecOutput) and event.exec_id == exec_id:
                    output += base64.b64decode(event.data_b64)
    return output.decode()


async def test_a_sandbox_reads_neither_other_sandboxes_nor_the_controllers_secrets() -> None:
    """What a user's commands in their CLI VM can read: their own home, the system; not another user's
    credentials or agent socket, nor the database, vault keys or config of the controller."""
    # Not under /tmp, which every sandbox sees empty anyway: the state directory must be hidden itself.
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-", dir="/var/tmp"))
    config = state_dir.with_name(state_dir.name + "-config.toml")
    config.write_text('turn_secret = "hunter2-hunter2"\n')
    backend = ProcessBackend(state_dir, hidden=[config])
    try:
        if not backend.bwrap_usable():
            pytest.skip("bubblewrap cannot create namespaces here")
        (state_dir / "vault.json").write_text('{"keys": "the vault key"}')
        (state_dir / "browservm.db").write_text("sealed credentials of every user")
        mine = await backend.create(SandboxSpec(sandbox_id="mine", role="cli"))
        theirs = await backend.create(SandboxSpec(sandbox_id="theirs", role="cli"))
        channel = await backend.connect(mine, timeout_s=BOOT_S)
        other = await backend.connect(theirs, timeout_s=BOOT_S)
        try:
            blob = protocol.FileBlob(path=".claude/.credentials.json", content_b64="c2VjcmV0LXRva2Vu")
            await other.request(protocol.WriteFiles(id=other.next_id(), files=[blob]))
            await channel.request(protocol.WriteFiles(id=channel.next_id(), files=[blob]))
            sandboxes = state_dir / "sandboxes"
            assert await shell(channel, f"ls {state_dir}; ls {sandboxes}") == "sandboxes\nmine\n"
            assert await shell(channel, "cat .claude/.credentials.json") == "secret-token"
            for path in (
                sandboxes / "theirs/home/.claude/.credentials.json",
                sandboxes / "theirs/run/agent.sock",
                state_dir / "vault.json",
                state_dir / "browservm.db",
            ):
                assert "No such file" in await shell(channel, f"cat {path}"), path
            read = await shell(channel, f"cat {config}")  # /dev/null over it, on a nodev mount
            assert "hunter2" not in read and "Permission denied" in read, read
            assert (sandboxes / "theirs/home/.claude/.credentials.json").exists(), "still there for its owner"
        finally:
            await channel.close()
            await other.close()
            await backend.destroy(mine)
            await backend.destroy(theirs)
    finally:
        await backend.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        config.unlink(missing_ok=True)
