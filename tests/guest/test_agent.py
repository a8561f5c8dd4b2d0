"""The guest agent as a real process on a real unix socket, driven through the controller's Channel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import BaseModel

from browservm import protocol
from browservm.sandbox.channel import AgentError, Channel
from tests.support.devtools import eventually_page_url
from tests.support.pipes import process_with_marker, until_blocked


@dataclass
class AgentProcess:
    sandbox_id: str
    socket: Path
    home: Path
    run_dir: Path
    process: subprocess.Popen[bytes]

    async def connect(self) -> Channel:
        async with asyncio.timeout(10):
            while True:
                assert self.process.poll() is None, (
                    "agent exited:\n" + (self.run_dir / "agent.log").read_text()
                )
                try:
                    reader, writer = await asyncio.open_unix_connection(str(self.socket))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.02)
            return await Channel.handshake(self.sandbox_id, reader, writer)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="bvm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_agent(base: Path, role: str, sandbox_id: str = "sb-test", *extra: str) -> AgentProcess:
    home, run_dir = base / "home", base / "run"
    run_dir.mkdir(parents=True)
    socket = run_dir / "agent.sock"
    with (run_dir / "agent.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "browservm.guest.agent", "--sandbox-id", sandbox_id, "--role", role,
             "--listen", f"unix:{socket}", "--home", str(home), "--run-dir", str(run_dir), *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return AgentProcess(sandbox_id, socket, home, run_dir, process)


def stop_agent(agent: AgentProcess) -> None:
    if agent.process.poll() is None:
        agent.process.send_signal(signal.SIGTERM)
        try:
            agent.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(agent.process.pid, signal.SIGKILL)
            agent.process.wait()


@pytest.fixture
def cli_agent(short_dir: Path) -> Iterator[AgentProcess]:
    agent = start_agent(short_dir, "cli")
    yield agent
    stop_agent(agent)


@pytest.fixture
async def cli_channel(cli_agent: AgentProcess) -> AsyncIterator[Channel]:
    channel = await cli_agent.connect()
    yield channel
    await channel.close()


async def next_event(
    queue: asyncio.Queue[BaseModel | None], kind: type[BaseModel], timeout_s: float = 10
) -> BaseModel:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await queue.get()
            assert event is not None, "channel closed while waiting for an event"
            if isinstance(event, kind):
                return event


async def run_exec(channel: Channel, **fields: Any) -> tuple[bytes, bytes, protocol.ExecExit]:
    out, err = b"", b""
    command = await channel.exec(protocol.Exec(**fields))
    try:
        async with asyncio.timeout(15):
            async for event in command:
                if isinstance(event, protocol.ExecExit):
                    return out, err, event
                data = base64.b64decode(event.data_b64)
                if event.stream == "stdout":
                    out += data
                else:
                    err += data
    finally:
        await command.close()
    raise AssertionError("the command's output ended without its exit")


async def test_hello_and_status(cli_channel: Channel) -> None:
    assert cli_channel.hello.role == "cli"
    assert cli_channel.hello.protocol == protocol.PROTOCOL_VERSION
    assert {"exec", "files"} <= set(cli_channel.hello.capabilities)
    status = await cli_channel.request(protocol.Status())
    assert status.sandbox_id == "sb-test"
    assert status.configured is False
    assert status.services == {}


async def test_unknown_and_malformed_requests_get_errors_and_the_agent_keeps_serving(
    cli_agent: AgentProcess,
) -> None:
    """A newer controller's request, and a broken one, are answered by id: neither ends the channel."""
    channel = await cli_agent.connect()
    try:
        with pytest.raises(AgentError) as refused:
            await channel.request(protocol.Configure(session_id="s1"))
        assert refused.value.code == "wrong_role"
    finally:
        await channel.close()
    reader, writer = await asyncio.open_unix_connection(str(cli_agent.socket))
    try:

        async def reply_to(payload: bytes) -> protocol.ErrorBody:
            writer.write(struct.pack(">IB", len(payload) + 1, protocol.FRAME_MESSAGE) + payload)
            frame = await asyncio.wait_for(protocol.read_frame(reader), 5)
            assert isinstance(frame, protocol.MessageFrame)
            reply = protocol.decode_message(frame.payload)
            assert isinstance(reply, protocol.Reply) and reply.error is not None
            return reply.error

        hello = await asyncio.wait_for(protocol.read_frame(reader), 5)
        assert isinstance(hello, protocol.MessageFrame)
        assert isinstance(protocol.decode_message(hello.payload), protocol.Hello)
        assert (await reply_to(b'{"type": "teleport", "id": 9001}')).code == "unknown_type"
        # A known type with a missing field is answered too (not a crash, not silence).
        assert (await reply_to(b'{"type": "open_url", "id": 9002}')).code == "bad_request"
        status = b'{"type": "status", "id": 9003}'
        writer.write(struct.pack(">IB", len(status) + 1, protocol.FRAME_MESSAGE) + status)
        frame = await asyncio.wait_for(protocol.read_frame(reader), 5)
        assert isinstance(frame, protocol.MessageFrame)
        reply = protocol.decode_message(frame.payload)
        assert isinstance(reply, protocol.Reply) and reply.ok, "and it still serves"
        assert protocol.AgentStatus.model_validate(reply.result).role == "cli"
    finally:
        writer.close()


async def test_write_files_is_atomic_with_mode_and_refuses_escapes(
    cli_channel: Channel, cli_agent: AgentProcess, short_dir: Path
) -> None:
    secret = b'{"token": "abc"}'
    blob = protocol.FileBlob(
        path=".codex/auth.json", content_b64=base64.b64encode(secret).decode(), mode=0o600
    )
    result = await cli_channel.request(protocol.WriteFiles(files=[blob]))
    assert result.written == [".codex/auth.json"]
    written = cli_agent.home / ".codex" / "auth.json"
    assert written.read_bytes() == secret
    assert written.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in written.parent.iterdir()] == ["auth.json"], "no temp file left behind"

    outside = short_dir / "outside"
    outside.mkdir()
    (cli_agent.home / "link").symlink_to(outside)
    for bad in ("/etc/passwd", "../escape", ".codex/../../escape", "link/planted"):
        with pytest.raises(AgentError) as refused:
            await cli_channel.request(
                protocol.WriteFiles(
                    files=[protocol.FileBlob(path=bad, content_b64=base64.b64encode(b"x").decode())],
                )
            )
        assert refused.value.code == "bad_path", bad
    assert list(outside.iterdir()) == []
    assert not (short_dir / "escape").exists()


async def test_write_files_merges_json_into_the_users_own_file(
    cli_channel: Channel, cli_agent: AgentProcess
) -> None:
    """A delivered setting lands beside the user's own: their MCP servers and nested settings stay."""
    config = cli_agent.home / ".claude.json"
    config.write_text(json.dumps({"mcpServers": {"db": {"command": "x"}}, "ui": {"theme": "dark", "v": 1}}))
    settings = cli_agent.home / ".gemini" / "settings.json"
    settings.parent.mkdir()
    settings.write_text("{ not json")

    def merged(path: str, value: object) -> protocol.FileBlob:
        content = base64.b64encode(json.dumps(value).encode()).decode()
        return protocol.FileBlob(path=path, content_b64=content, merge="json")

    files = [
        merged(".claude.json", {"hasCompletedOnboarding": True, "ui": {"theme": "light"}}),
        merged(".gemini/settings.json", {"security": {"auth": {"selectedType": "oauth-personal"}}}),
    ]
    await cli_channel.request(protocol.WriteFiles(files=files))
    assert json.loads(config.read_text()) == {
        "mcpServers": {"db": {"command": "x"}},
        "ui": {"theme": "light", "v": 1},
        "hasCompletedOnboarding": True,
    }
    assert config.stat().st_mode & 0o777 == 0o600
    assert json.loads(settings.read_text()) == {"security": {"auth": {"selectedType": "oauth-personal"}}}
    assert (settings.parent / "settings.json.unreadable").read_text() == "{ not json", "kept, not lost"

    with pytest.raises(AgentError) as refused:
        await cli_channel.request(
            protocol.WriteFiles(files=[merged(".claude.json", ["not", "an", "object"])])
        )
    assert refused.value.code == "bad_request"
    assert "must be a JSON object" in str(refused.value)
    assert json.loads(config.read_text())["hasCompletedOnboarding"] is True, "a refused merge writes nothing"


async def test_exec_streams_output_and_exit_code(cli_channel: Channel, cli_agent: AgentProcess) -> None:
    out, err, exit_ = await run_exec(
        cli_channel,
        argv=["sh", "-c", 'cat; echo "home=$HOME pwd=$(pwd) v=$V"; echo oops >&2; exit 3'],
        env={"V": "42"},
        stdin_b64=base64.b64encode(b"from stdin\n").decode(),
    )
    home = str(cli_agent.home.resolve())
    assert out == f"from stdin\nhome={home} pwd={home} v=42\n".encode()
    assert err == b"oops\n"
    assert exit_.exit_code == 3
    assert not exit_.timed_out


async def test_exec_timeout_kills_the_command(cli_channel: Channel) -> None:
    started = asyncio.get_running_loop().time()
    out, _, exit_ = await run_exec(cli_channel, argv=["sh", "-c", "echo begun; sleep 30"], timeout_s=0.5)
    assert out == b"begun\n"
    assert exit_.timed_out
    assert exit_.exit_code == -signal.SIGKILL
    assert asyncio.get_running_loop().time() - started < 5


SIZE = 8 * 1024 * 1024


async def test_unread_exec_output_blocks_the_command_not_the_channel(
    cli_channel: Channel, cli_agent: AgentProcess
) -> None:
    """Output nobody takes stops at the command's window: the command blocks on its pipe, as in a shell
    pipeline, while other commands and requests keep flowing; once read, the output is complete."""
    command = await cli_channel.exec(
        protocol.Exec(argv=["head", "-c", str(SIZE), "/dev/zero"], env={"BVM_TEST_MARKER": "unread"})
    )
    try:
        head = await process_with_marker("unread", psutil.Process(cli_agent.process.pid))
        written = await until_blocked(head)
        # Its window, what the agent's pipe reader buffers and the pipe itself: far from all 8 MiB.
        assert written < protocol.EXEC_WINDOW_BYTES + 1024 * 1024, written
        out, _, exit_ = await run_exec(cli_channel, argv=["echo", "still flowing"])
        assert (out, exit_.exit_code) == (b"still flowing\n", 0)
        assert (await cli_channel.request(protocol.Status())).role == "cli"
        received = 0
        async with asyncio.timeout(60):
            async for event in command:
                if isinstance(event, protocol.ExecOutput):
                    data = base64.b64decode(event.data_b64)
                    assert data.count(0) == len(data)
                    received += len(data)
                else:
                    assert event.exit_code == 0
        assert received == SIZE, "read at last, every byte arrives"
    finally:
        await command.close()


async def test_a_command_whose_reader_goes_away_gets_a_broken_pipe(
    cli_channel: Channel, cli_agent: AgentProcess
) -> None:
    command = await cli_channel.exec(
        protocol.Exec(argv=["head", "-c", str(SIZE), "/dev/zero"], env={"BVM_TEST_MARKER": "abandoned"})
    )
    head = await process_with_marker("abandoned", psutil.Process(cli_agent.process.pid))
    await until_blocked(head)
    await command.close()  # the reader is gone for good
    await asyncio.to_thread(head.wait, 10)  # it ends on its next write, long before its 300 s timeout
    assert not head.is_running()
    out, _, _ = await run_exec(cli_channel, argv=["echo", "next"])
    assert out == b"next\n"


async def test_exec_of_a_missing_program_is_an_error_reply(cli_channel: Channel) -> None:
    with pytest.raises(AgentError) as refused:
        await cli_channel.request(protocol.Exec(argv=["/nonexistent/tool"]))
    assert refused.value.code == "bad_request"


async def test_a_new_connection_replaces_the_old_and_the_agent_survives_a_vanished_client(
    cli_agent: AgentProcess,
) -> None:
    first = await cli_agent.connect()
    second = await cli_agent.connect()
    async with asyncio.timeout(5):
        await first.closed.wait()  # replaced: the old controller's channel ends
    assert second.hello.sandbox_id == "sb-test"
    assert (await second.request(protocol.Status())).role == "cli"
    # The controller dies without a goodbye: the agent keeps running and takes the next one.
    await first.close()
    await second.close()
    third = await cli_agent.connect()
    try:
        assert (await third.request(protocol.Status())).sandbox_id == "sb-test"
        assert cli_agent.process.poll() is None
    finally:
        await third.close()


async def test_shutdown_exits_cleanly(cli_agent: AgentProcess) -> None:
    channel = await cli_agent.connect()
    await channel.request(protocol.Shutdown())
    await channel.close()
    assert await asyncio.to_thread(cli_agent.process.wait, 10) == 0
    assert not cli_agent.socket.exists()


def _login_module_exists() -> bool:
    import importlib.util

    return importlib.util.find_spec("browservm.guest.login") is not None


@pytest.mark.browser
async def test_login_progress_reaches_the_controller_and_a_reconnect_gets_the_snapshot(
    short_dir: Path,
) -> None:
    if not _login_module_exists():
        pytest.skip("browservm.guest.login is not built yet")
    agent = start_agent(short_dir, "browser", sandbox_id="sb-login")
    try:
        channel = await agent.connect()
        async with channel.subscribe() as events:
            # The demo provider without its 'issuer' option cannot start: the failure must reach the
            # controller as a LoginState, not vanish in the agent's log.
            await channel.request(
                protocol.Configure(
                    session_id="s1",
                    provider="demo",
                    screen=protocol.ScreenConfig(width=640, height=480, fps=5),
                )
            )
            failed = await next_event(events, protocol.LoginState, timeout_s=20)
        assert isinstance(failed, protocol.LoginState)
        assert failed.state == "failed"
        assert "issuer" in failed.detail
        await channel.close()

        again = await agent.connect()
        try:
            snapshot: list[BaseModel] = []
            async with again.subscribe() as events:
                status = await again.request(protocol.Status())
                while not events.empty():
                    event = events.get_nowait()
                    assert event is not None
                    snapshot.append(event)
            services = {e.service for e in snapshot if isinstance(e, protocol.ServiceState)}
            assert {"xvfb", "chromium", "vnc", "streamer"} <= services
            assert [e.state for e in snapshot if isinstance(e, protocol.LoginState)] == ["failed"]
            assert status.login is not None and status.login.state == "failed"
        finally:
            await again.close()
    finally:
        stop_agent(agent)


@pytest.mark.browser
async def test_a_prepared_sandbox_serves_only_the_session_it_was_prepared_for(short_dir: Path) -> None:
    """Prepare starts the browser's services without a session (the warm pool); Configure then hands the
    session over without restarting them, and refuses settings the services were not started with."""
    agent = start_agent(short_dir, "browser", sandbox_id="sb-warm")
    screen = protocol.ScreenConfig(width=640, height=480, fps=5)
    debug = protocol.Debug(devtools_port=True)  # beside the agent's pipe, to watch the page
    try:
        channel = await agent.connect()
        assert "prepare" in channel.hello.capabilities
        ready: set[str] = set()
        async with channel.subscribe() as events:
            await channel.request(protocol.Prepare(screen=screen, debug=debug))
            async with asyncio.timeout(30):
                while ready != {"xvfb", "chromium", "vnc", "streamer"}:
                    event = await events.get()
                    assert event is not None
                    if isinstance(event, protocol.ServiceState) and event.state == "ready":
                        ready.add(event.service)
        prepared = await channel.request(protocol.Status())
        assert prepared.prepared and not prepared.configured
        assert prepared.devtools_port, "asked for: the test watches the page through it"
        pids = prepared.pids

        with pytest.raises(AgentError) as refused:
            await channel.request(protocol.Prepare(screen=screen))
        assert refused.value.code == "already_configured"
        other_screen = protocol.ScreenConfig(width=800, height=600, fps=5)
        with pytest.raises(AgentError) as refused:
            await channel.request(protocol.Configure(session_id="s1", screen=other_screen))
        assert refused.value.code == "prepared_differently"
        assert "screen" in str(refused.value)

        page = "data:text/html,<title>handed over</title>"
        turn = protocol.IceServer(urls=["turn:127.0.0.1:3478"], username="1:s1", credential="c")
        await channel.request(
            protocol.Configure(
                session_id="s1",
                screen=screen,
                stream=protocol.StreamConfig(ice_servers=[turn]),  # the session's own: allowed to differ
                start_url=page,
                debug=debug,
            )
        )
        await eventually_page_url(channel, page)
        status = await channel.request(protocol.Status())
        assert status.configured
        assert status.pids == pids, "handing the session over restarted no service"
        await channel.close()
    finally:
        stop_agent(agent)


@pytest.mark.browser
async def test_the_agent_drives_chromium_over_a_pipe_and_no_port_is_open(short_dir: Path) -> None:
    """Loopback may be shared with other sandboxes: Chromium must not listen on it unless asked."""
    import psutil

    agent = start_agent(short_dir, "browser", sandbox_id="sb-pipe")
    try:
        channel = await agent.connect()
        async with channel.subscribe() as events:
            screen = protocol.ScreenConfig(width=640, height=480, fps=5)
            await channel.request(protocol.Configure(session_id="s1", screen=screen, start_url="about:blank"))
            async with asyncio.timeout(30):
                while True:
                    event = await events.get()
                    assert event is not None
                    if isinstance(event, protocol.ServiceState) and event.service == "chromium":
                        assert event.state != "failed", event.detail
                        if event.state == "ready":
                            break
        opened = await channel.request(protocol.OpenUrl(url="data:text/html,<title>over the pipe</title>"))
        assert opened.url == "data:text/html,<title>over the pipe</title>"
        status = await channel.request(protocol.Status())
        assert status.devtools_port is None
        assert not (short_dir / "run" / "chromium-profile" / "DevToolsActivePort").exists()
        browser = psutil.Process(status.pids["chromium"])
        listening = []
        for process in (browser, *browser.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):  # Chromium ends helpers as it likes
                connections = process.net_connections(kind="inet")
                listening += [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
        assert listening == [], f"Chromium listens on {listening}"
        await channel.close()
    finally:
        stop_agent(agent)


async def exited(agent: AgentProcess, within_s: float) -> int:
    return await asyncio.to_thread(agent.process.wait, within_s)


async def test_an_agent_ends_itself_when_no_controller_speaks_to_it(short_dir: Path) -> None:
    """A controller that went away for good must not leave its sandboxes running for ever: while one is
    connected its channel's heartbeat keeps the agent, and the agent ends itself once it falls silent."""
    agent = start_agent(short_dir, "cli", "sb-idle", "--idle-timeout-s", "1")
    try:
        channel = await agent.connect()
        assert channel.hello.idle_timeout_s == 1
        await asyncio.sleep(3)  # three idle timeouts with a controller connected and speaking
        assert agent.process.poll() is None, "the heartbeat keeps it"
        assert (await channel.request(protocol.Status())).sandbox_id == "sb-idle"
        await channel.close()
        assert await exited(agent, 10) == 0
        assert "no controller has spoken to this sandbox" in (agent.run_dir / "agent.log").read_text()
        assert not agent.socket.exists(), "it stopped as on SIGTERM, cleaning up"
    finally:
        stop_agent(agent)


def test_the_idle_timeout_is_checked_on_the_command_line(short_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "browservm.guest.agent", "--sandbox-id", "x", "--role", "cli",
         "--listen", f"unix:{short_dir}/a.sock", "--home", str(short_dir), "--run-dir", str(short_dir),
         "--idle-timeout-s", "-5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--idle-timeout-s must be 0 (never)" in result.stderr


@pytest.mark.browser
async def test_a_browser_sandbox_past_its_sessions_expiry_ends_itself(short_dir: Path) -> None:
    agent = start_agent(short_dir, "browser", "sb-expiry", "--idle-timeout-s", "0")  # only the expiry
    try:
        channel = await agent.connect()
        assert channel.hello.idle_timeout_s is None
        screen = protocol.ScreenConfig(width=640, height=480, fps=5)
        await channel.request(protocol.Configure(session_id="s1", screen=screen, expires_in_s=2))
        assert await exited(agent, 30) == 0
        await channel.close()
        assert "its session is over" in (agent.run_dir / "agent.log").read_text()
    finally:
        stop_agent(agent)
