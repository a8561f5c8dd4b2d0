"""The process backend with real agents: bubblewrap, Xvfb, Chromium and x11vnc as a user gets them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from pydantic import BaseModel

from browservm import protocol
from browservm.sandbox.base import GuestImage, Liveness, SandboxError, SandboxHandle, SandboxSpec
from browservm.sandbox.channel import AgentError
from browservm.sandbox.process import MARKER_ENV, ProcessBackend, ProcessRuntime
from tests.support.commands import shell
from tests.support.devtools import evaluate_in_page, eventually_page_url
from tests.support.image import image_tree
from tests.support.network import BackendNetwork

BOOT_S = 20.0
DEBUG_PORT = protocol.Debug(devtools_port=True)
"""Service environment that opens a DevTools port beside the agent's pipe, so a test can watch the page."""


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

    The agent lives in its own PID namespace, so its pids mean nothing out here; ``NSpid`` in /proc lists
    a process's pid in each namespace, innermost last.
    """
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


@pytest.mark.browser
async def test_browser_sandbox_shows_the_page_survives_a_chromium_crash_and_is_destroyed(
    backend: ProcessBackend, network: BackendNetwork, web_pages: str
) -> None:
    handle = await backend.create(await network.spec("br1", "browser"))
    netns = network.netns("br1")
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    seen: list[protocol.ServiceState] = []
    try:
        async with channel.subscribe() as events:
            start_url = f"{web_pages}/start.html"
            configure = protocol.Configure(
                session_id="s1",
                start_url=start_url,
                screen=protocol.ScreenConfig(width=800, height=600, fps=5),
                debug=DEBUG_PORT,  # the test watches the page through it; the agent uses its pipe
            )
            result = await channel.request(configure)
            assert {"xvfb", "chromium", "vnc"} <= set(result.services)
            await wait_state(events, "xvfb", "ready", seen)
            await wait_state(events, "chromium", "ready", seen)
            status = await channel.request(protocol.Status())
            assert status.display is not None and status.display.startswith(":")
            await eventually_page_url(channel, start_url, netns)

            # The user (or the login) moves on; a crash later must come back on *that* page.
            next_url = f"{web_pages}/next.html"
            await channel.request(protocol.OpenUrl(url=next_url))
            await eventually_page_url(channel, next_url, netns)

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
                await channel.request(protocol.Signal(peer_id="viewer-1", kind="offer"))
            assert refused.value.code == "bad_request"
            assert "sdp" in refused.value.message

            before = await channel.request(protocol.Status())
            assert before.services["chromium"].restarts == 0, before.services["chromium"]
            seen.clear()
            chromium_pid = before.pids["chromium"]
            assert chromium_pid is not None
            os.kill(host_pid(handle, chromium_pid), signal.SIGKILL)
            restarting = await wait_state(events, "chromium", "restarting", seen)
            assert restarting.restarts == 1
            await wait_state(events, "chromium", "ready", seen)
            touched = [s for s in seen if s.service in ("xvfb", "vnc")]
            assert touched == [], f"other services were touched: {touched}"
            after = await channel.request(protocol.Status())
            assert after.pids["xvfb"] == before.pids["xvfb"]
            assert after.pids["vnc"] == before.pids["vnc"]
            assert after.services["chromium"].restarts == 1
            await eventually_page_url(channel, next_url, netns)
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
    await first.request(protocol.WriteFiles(files=[protocol.FileBlob(path="note.txt", content_b64="aGk=")]))
    await first.close()  # the controller goes away without a goodbye

    adopted = SandboxHandle("cli1", "process", "cli", dict(handle.runtime))
    assert await backend.probe(adopted) == Liveness.ALIVE
    second = await backend.connect(adopted, timeout_s=BOOT_S)
    try:
        assert await shell(second, 'cat note.txt; echo " $EXTRA"') == (0, "hi yes\n")
    finally:
        await second.close()
    await backend.destroy(adopted)
    assert await backend.probe(handle) == Liveness.GONE


async def test_hibernate_keeps_home_and_resume_runs_again(backend: ProcessBackend) -> None:
    handle = await backend.create(SandboxSpec(sandbox_id="cli2", role="cli"))
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    await channel.request(
        protocol.WriteFiles(files=[protocol.FileBlob(path=".codex/auth.json", content_b64="e30=")])
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


async def test_a_sandbox_whose_record_is_lost_is_destroyed_whole_from_its_id(
    backend: ProcessBackend, network: BackendNetwork, state_dir: Path
) -> None:
    """A controller that knows nothing of a sandbox (its record lost) still ends every process of it,
    in its cgroup and its network namespace, and removes its directory and cgroup. The namespace is the
    controller's: its reconciler removes it (tests/controller/test_reconciler.py)."""
    handle = await backend.create(await network.spec("lost1", "cli"))
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    await shell(channel, "sleep 300 >/dev/null 2>&1 & echo started")
    await channel.close()
    netns = network.netns("lost1")
    assert sandbox_processes(handle) and _pids_in(netns)

    restarted = ProcessBackend(state_dir, image_tree())
    assert await restarted.list_orphans([]) == ["lost1"]
    await restarted.destroy_orphan("lost1")
    assert sandbox_processes(handle) == []
    assert _pids_in(netns) == [], "nothing of the sandbox runs in its namespace"
    assert not Path(handle.runtime["dir"]).exists()
    if restarted.cgroups is not None:
        assert "lost1" not in restarted.cgroups.sandbox_ids()
    assert await restarted.list_orphans([]) == []
    await restarted.destroy_orphan("lost1")  # idempotent
    assert await backend.probe(handle) == Liveness.GONE


def _pids_in(netns: str) -> list[str]:
    return subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=True
    ).stdout.split()


async def test_a_backend_without_an_image_of_its_own_runs_the_one_the_spec_names(state_dir: Path) -> None:
    bare = ProcessBackend(state_dir)
    with pytest.raises(SandboxError, match="no guest image"):
        await bare.create(SandboxSpec(sandbox_id="unnamed", role="cli"))
    tree = image_tree("minimal")
    named = GuestImage(tree.parent.name, tree=tree)
    handle = await bare.create(SandboxSpec(sandbox_id="named", role="cli", image=named))
    try:
        channel = await bare.connect(handle, timeout_s=BOOT_S)
        assert await shell(channel, "test -x /usr/bin/chromium || echo no browser here") == (
            0,
            "no browser here\n",
        ), "it runs the minimal image the spec named"
        await channel.close()
        assert handle.runtime_as(ProcessRuntime).image == tree
    finally:
        await bare.destroy(handle)
        await bare.close()


async def test_an_agent_that_cannot_start_fails_fast_with_its_log(state_dir: Path) -> None:
    backend = ProcessBackend(state_dir, image_tree(), python="/bin/false")
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
    assert "bubblewrap" in readiness.detail and "seccomp" in readiness.detail


@pytest.mark.browser
async def test_demo_login_through_the_sandbox_browser_delivers_credentials(
    backend: ProcessBackend, network: BackendNetwork
) -> None:
    from tests.demo.oauth_server import demo_oauth_server

    handle = await backend.create(await network.spec("login1", "browser"))
    netns = network.netns("login1")
    channel = await backend.connect(handle, timeout_s=BOOT_S)
    try:
        with demo_oauth_server(host=network.gateway, port=network.web_port) as issuer:
            async with channel.subscribe() as events:
                await channel.request(
                    protocol.Configure(
                        session_id="s-login",
                        provider="demo",
                        provider_options={"issuer": issuer},
                        screen=protocol.ScreenConfig(width=800, height=600, fps=5),
                        debug=DEBUG_PORT,
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
                await eventually_page_url(channel, event.url, netns)

                # The user signs in on the page the sandbox's Chromium shows.
                status = await channel.request(protocol.Status())
                submitted = await evaluate_in_page(
                    status.devtools_port,
                    "document.getElementById('email').value = 'ada@example.com';"
                    "document.getElementById('password').value = 'demo';"
                    "document.querySelector('form').submit(); 'sent'",
                    netns,
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

            files = (await channel.request(protocol.CollectCredentials())).files
            assert [blob.path for blob in files] == [".browservm-demo/credentials.json"]
            assert files[0].mode == 0o600
    finally:
        await channel.close()
        await backend.destroy(handle)
