"""The guest agent: the channel server inside every sandbox (``python -m browservm.guest.agent``).

It listens on the channel endpoint and the controller connects. Each new connection gets ``Hello``, then a
snapshot of the current state (each service's latest ``ServiceState`` and the latest ``LoginState``), then
requests are served. One controller at a time: a new connection replaces the old one, which is how a
restarted controller adopts a running sandbox. The agent outlives its controller; it stops on
``shutdown`` or SIGTERM, stopping every service first.

Roles: a ``browser`` sandbox runs the display services (Xvfb, Chromium, x11vnc, the WebRTC streamer) under
the :class:`~browservm.guest.supervisor.Supervisor` and the provider's login; a ``cli`` sandbox writes
files into the user's home and runs commands there.

This module imports only :mod:`browservm.protocol`, ``browservm.guest`` and third-party libraries: it runs
with the guest image's own Python.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.guest.display import ChromiumService, XvfbService
from browservm.guest.files import ExecRunner, FileRequestError, write_files
from browservm.guest.supervisor import Service, ServiceLog, ServiceUnavailable, Supervisor, kill_group, spawn
from browservm.guest.vnc import VncAuthError, VncBridge, VncService

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"
STREAMER_CONNECT_S = 15.0
SIGNAL_TIMEOUT_S = 15.0
STREAMER_RESTART_WAIT_S = 10.0
"""How long an offer waits for a (re)starting streamer; the controller gives an offer 20 s in all."""
LOGIN_DISPLAY_WAIT_S = 60.0
STREAM_BACKLOG = 32
"""Outgoing frames queued before a VNC pump waits for the controller to catch up."""

Role = Literal["browser", "cli"]
Handler = Callable[[Any, Any], Awaitable[dict[str, Any] | None]]


class RequestError(Exception):
    """A request the agent answers with an error Reply (``code`` and a message saying what to do)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------- listeners


ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ChannelListener(abc.ABC):
    """Where the controller reaches the agent. A serial port or vsock listener drops in beside unix."""

    @abc.abstractmethod
    async def start(self, on_connection: ConnectionHandler) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class UnixListener(ChannelListener):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.Server | None = None

    async def start(self, on_connection: ConnectionHandler) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket file left by an agent that was killed
        self._server = await asyncio.start_unix_server(on_connection, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def listener_for(address: str) -> ChannelListener:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        return UnixListener(Path(rest))
    if scheme in ("serial", "vsock"):
        raise SystemExit(f"--listen {address}: {scheme} channels arrive with the VM backends; use unix:PATH")
    raise SystemExit(f"--listen {address}: expected unix:/path/agent.sock")


# ---------------------------------------------------------------------------------------------- streamer


class StreamerLink:
    """The agent's connection to the streamer's unix socket: relays signaling, learns readiness."""

    def __init__(self, emit: Callable[[BaseModel], None], on_lost: Callable[[], None]) -> None:
        self.emit = emit
        self.on_lost = on_lost
        self.ready = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[protocol.Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.peers: set[str] = set()
        """Viewers the streamer answered and has not closed: told ``closed`` if the streamer goes away."""

    async def connect(self, path: Path, timeout_s: float) -> None:
        """Connect, retrying until the streamer has created its socket (bounded by ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    reader, self._writer = await asyncio.open_unix_connection(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._read(reader), name="streamer-link")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                if frame[0] != protocol.FRAME_MESSAGE:
                    continue
                message = frame[1]
                if isinstance(message, protocol.Reply):
                    future = self._pending.get(message.id)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif isinstance(message, protocol.ServiceState):
                    if message.state == "ready":
                        self.ready.set()
                elif isinstance(message, protocol.SignalEvent):
                    if message.kind == "closed":
                        self.peers.discard(message.peer_id)
                    self.emit(message)
        except (protocol.ProtocolError, ConnectionError) as exc:
            log.warning("streamer.link_broken", error=str(exc))
        finally:
            self.ready.clear()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(RequestError("streamer_unavailable", "the streamer went away"))
            # Their peer connections died with the streamer. Without this notice a viewer learns it
            # only from ICE timing out (about 5 s), then tries an ICE restart that brings the video back
            # from the restarted streamer but not the data channel: input would be lost.
            for peer_id in sorted(self.peers):
                self.emit(protocol.SignalEvent(peer_id=peer_id, kind="closed"))
            self.peers.clear()
            self.on_lost()

    async def signal(self, request: protocol.Signal) -> dict[str, Any]:
        if self._writer is None or not self.ready.is_set():
            raise RequestError("streamer_unavailable", "the streamer is not ready; retry or use VNC")
        own_id = next(self._ids)
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._pending[own_id] = future
        try:
            self._writer.write(protocol.encode_message(request.model_copy(update={"id": own_id})))
            await self._writer.drain()
            reply = await asyncio.wait_for(future, SIGNAL_TIMEOUT_S)
        except TimeoutError as exc:
            raise RequestError("streamer_timeout", f"no answer within {SIGNAL_TIMEOUT_S:.0f}s") from exc
        finally:
            self._pending.pop(own_id, None)
        if not reply.ok:
            error = reply.error or protocol.ErrorBody(code="streamer_error", message="no error body")
            raise RequestError(error.code, error.message)
        if request.kind == "offer":
            self.peers.add(request.peer_id)
        elif request.kind == "close":
            self.peers.discard(request.peer_id)
        return reply.result

    async def close(self) -> None:
        await cancel_and_wait([self._task])
        if self._writer is not None:
            self._writer.close()


class StreamerService(Service):
    """``python -m browservm.guest.streamer``: ready once it reports a first encoded frame."""

    name = "streamer"
    requires = ("xvfb",)
    ready_timeout_s = 30.0

    def __init__(
        self,
        xvfb: XvfbService,
        socket_path: Path,
        screen: protocol.ScreenConfig,
        stream: protocol.StreamConfig,
        env: dict[str, str],
        emit: Callable[[BaseModel], None],
    ) -> None:
        self.xvfb = xvfb
        self.socket_path = socket_path
        self.screen = screen
        self.stream = stream
        self.env = env
        self.emit = emit
        self.link: StreamerLink | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        if importlib.util.find_spec("browservm.guest.streamer") is None:
            raise ServiceUnavailable(
                "browservm.guest.streamer is not in this guest image: WebRTC is off, viewers fall back to VNC"
            )
        assert self.xvfb.display is not None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        ice = [server.model_dump(exclude_none=True) for server in self.stream.ice_servers]
        argv = [
            sys.executable,
            "-m",
            "browservm.guest.streamer",
            "--display",
            self.xvfb.display,
            "--socket",
            str(self.socket_path),
            "--width",
            str(self.screen.width),
            "--height",
            str(self.screen.height),
            "--fps",
            str(self.screen.fps),
            "--codec",
            self.stream.codec,
            "--min-kbps",
            str(self.stream.min_bitrate_kbps),
            "--max-kbps",
            str(self.stream.max_bitrate_kbps),
            "--ice-servers",
            json.dumps(ice),
        ]
        if self.stream.host_addresses:
            argv += ["--host-addresses", ",".join(self.stream.host_addresses)]
        self._process = await spawn(argv, env={**self.env, "DISPLAY": self.xvfb.display}, log_to=log_to)
        return self._process

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        link = StreamerLink(self.emit, on_lost=lambda: kill_group(process.pid, signal.SIGTERM))
        # A streamer whose socket went quiet is of no use: ending it makes the supervisor restart it.
        await link.connect(self.socket_path, STREAMER_CONNECT_S)
        try:
            await link.ready.wait()
        except BaseException:
            await link.close()
            raise
        self.link = link

    async def exited(self) -> None:
        if self.link is not None:
            await self.link.close()
            self.link = None


# ---------------------------------------------------------------------------------------------- login


class LoginRunnerLike(Protocol):
    """The contract of ``browservm.guest.login.LoginRunner`` (built beside this module)."""

    async def start(self) -> None: ...
    async def collect(self) -> list[protocol.FileBlob]: ...
    async def stop(self) -> None: ...


def load_login_runner() -> Callable[..., LoginRunnerLike] | None:
    """The LoginRunner class, or ``None`` when this guest image has no login module (yet)."""
    try:
        module = importlib.import_module("browservm.guest.login")
    except ImportError as exc:
        log.warning("login.unavailable", error=str(exc))
        return None
    runner: Callable[..., LoginRunnerLike] | None = getattr(module, "LoginRunner", None)
    return runner


# ---------------------------------------------------------------------------------------------- connection


_HEADER = struct.Struct(">IB")


class _Connection:
    """One controller connection: an ordered outgoing queue, its byte streams, its request tasks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, VncBridge] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._drained = asyncio.Event()
        self._writer_task = asyncio.create_task(self._write_loop(), name="agent-writer")

    def send(self, message: BaseModel) -> None:
        self._queue.put_nowait(protocol.encode_message(message))

    async def send_stream(self, stream_id: int, data: bytes) -> None:
        # Through the same queue as messages, so stream bytes never overtake the Reply that opened it.
        self._queue.put_nowait(protocol.encode_stream(stream_id, data))
        while self._queue.qsize() > STREAM_BACKLOG and not self._writer_task.done():
            self._drained.clear()
            await self._drained.wait()

    async def _write_loop(self) -> None:
        with contextlib.suppress(ConnectionError):
            while (data := await self._queue.get()) is not None:
                self.writer.write(data)
                await self.writer.drain()
                if self._queue.qsize() <= STREAM_BACKLOG // 2:
                    self._drained.set()
        self._drained.set()

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self, flush_s: float = 2.0) -> None:
        """Flush what is queued (bounded), then drop the connection, its streams and request tasks."""
        self._queue.put_nowait(None)
        await asyncio.wait({self._writer_task}, timeout=flush_s)
        self._writer_task.cancel()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for bridge in list(self.streams.values()):
            await bridge.close()
        self.streams.clear()
        self.writer.close()


async def _read_raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    # Framing is read here rather than with protocol.read_frame so that a malformed request can still
    # be answered: its id is only recoverable from the raw payload.
    try:
        header = await reader.readexactly(_HEADER.size)
        length, kind = _HEADER.unpack(header)
        if length < 1 or length > protocol.MAX_FRAME:
            raise protocol.ProtocolError(f"frame length {length} outside 1..{protocol.MAX_FRAME}")
        return kind, await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        return None


def _request_id(payload: bytes) -> int | None:
    try:
        raw = json.loads(payload)
    except ValueError:
        return None
    ident = raw.get("id") if isinstance(raw, dict) else None
    return ident if isinstance(ident, int) else None


# ---------------------------------------------------------------------------------------------- agent


class Agent:
    def __init__(self, sandbox_id: str, role: Role, home: Path, run_dir: Path) -> None:
        self.sandbox_id = sandbox_id
        self.role = role
        self.home = home
        self.run_dir = run_dir
        self.base_env = {**os.environ, "HOME": str(home)}
        self.supervisor = Supervisor(run_dir / "logs", self.emit)
        self.exec = ExecRunner(home, self.base_env, self.emit)
        self.stopped = asyncio.Event()
        self.connection: _Connection | None = None
        self.configured: protocol.Configure | None = None
        self.prepared: protocol.Prepare | None = None
        self.xvfb: XvfbService | None = None
        self.chromium: ChromiumService | None = None
        self.vnc: VncService | None = None
        self.streamer: StreamerService | None = None
        self.login: LoginRunnerLike | None = None
        self.login_state: protocol.LoginState | None = None
        self._stream_ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._serving: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, Handler] = {
            "configure": self._configure,
            "prepare": self._prepare,
            "status": self._status,
            "open_url": self._open_url,
            "signal": self._signal,
            "open_stream": self._open_stream,
            "write_files": self._write_files,
            "exec": self._exec,
            "collect_credentials": self._collect_credentials,
            "shutdown": self._shutdown,
        }

    @property
    def hello(self) -> protocol.Hello:
        capabilities = (
            ["display", "webrtc", "vnc", "login", "prepare"] if self.role == "browser" else ["exec", "files"]
        )
        return protocol.Hello(
            agent_version=AGENT_VERSION,
            sandbox_id=self.sandbox_id,
            role=self.role,
            capabilities=capabilities,
        )

    def emit(self, message: BaseModel) -> None:
        """Send an event to the controller connected now; with none connected, the snapshot covers it."""
        if self.connection is not None:
            self.connection.send(message)

    def _set_login_state(self, state: protocol.LoginState) -> None:
        self.login_state = state
        self.emit(state)

    # ------------------------------------------------------------------ connections

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(reader, writer)
        this_task = asyncio.current_task()
        if this_task is not None:
            self._serving.add(this_task)
            this_task.add_done_callback(self._serving.discard)
        # Hello and the snapshot are queued before this connection can receive any event (no await in
        # between): the controller's handshake needs Hello first.
        connection.send(self.hello)
        for state in self.supervisor.states():
            connection.send(state)
        if self.login_state is not None:
            connection.send(self.login_state)
        previous, self.connection = self.connection, connection
        if previous is not None:
            log.info("agent.connection_replaced")
            await previous.close(flush_s=0.2)
        try:
            await self._serve(connection)
        except (ConnectionError, protocol.ProtocolError) as exc:
            log.warning("agent.connection_lost", error=str(exc))
        finally:
            if self.connection is connection:
                self.connection = None
                await connection.close(flush_s=0.2)

    async def _serve(self, connection: _Connection) -> None:
        while (frame := await _read_raw_frame(connection.reader)) is not None:
            kind, payload = frame
            if kind == protocol.FRAME_STREAM:
                if len(payload) >= 4:
                    (stream_id,) = struct.unpack_from(">I", payload)
                    bridge = connection.streams.get(stream_id)
                    if bridge is not None:
                        try:
                            await bridge.write(payload[4:])
                        except ConnectionError:
                            # x11vnc dropped this viewer: end that stream, not the whole channel.
                            connection.streams.pop(stream_id, None)
                            await bridge.close()
                            connection.send(protocol.CloseStream(stream_id=stream_id))
                continue
            if kind != protocol.FRAME_MESSAGE:
                raise protocol.ProtocolError(f"unknown frame kind {kind}")
            try:
                message = protocol.decode_message(payload)
            except protocol.UnknownMessage as exc:
                if exc.request_id is not None:
                    self._reply_error(
                        connection,
                        exc.request_id,
                        "unknown_type",
                        f"{exc}; this agent is protocol {protocol.PROTOCOL_VERSION}, agent {AGENT_VERSION}",
                    )
                continue
            except protocol.ProtocolError as exc:
                request_id = _request_id(payload)
                if request_id is not None:
                    self._reply_error(connection, request_id, "bad_request", str(exc))
                else:
                    log.warning("agent.bad_message", error=str(exc))
                continue
            if isinstance(message, protocol.CloseStream):
                bridge = connection.streams.pop(message.stream_id, None)
                if bridge is not None:
                    await bridge.close()
                continue
            handler = self._handlers.get(getattr(message, "type", ""))
            if handler is not None:
                connection.spawn(self._answer(connection, handler, message))

    def _reply_error(self, connection: _Connection, request_id: int, code: str, message: str) -> None:
        error = protocol.ErrorBody(code=code, message=message)
        connection.send(protocol.Reply(id=request_id, ok=False, error=error))

    async def _answer(self, connection: _Connection, handler: Handler, request: Any) -> None:
        try:
            result = await handler(connection, request)
        except RequestError as exc:
            self._reply_error(connection, request.id, exc.code, exc.message)
        except FileRequestError as exc:
            self._reply_error(connection, request.id, exc.code, str(exc))
        except Exception as exc:
            # A bug or an unexpected failure answers this request; it never takes the agent down.
            log.exception("agent.request_failed", type=request.type)
            self._reply_error(connection, request.id, "internal", f"{type(exc).__name__}: {exc}")
        else:
            if result is not None:
                connection.send(protocol.Reply(id=request.id, ok=True, result=result))

    def _require_role(self, role: Role, what: str) -> None:
        if self.role != role:
            raise RequestError("wrong_role", f"{what} needs a {role} sandbox; this one is {self.role}")

    # ------------------------------------------------------------------ requests

    async def _configure(self, connection: _Connection, request: protocol.Configure) -> dict[str, Any]:
        self._require_role("browser", "configure")
        if self.configured is not None:
            raise RequestError(
                "already_configured",
                f"this sandbox already serves session {self.configured.session_id}; create a new one",
            )
        login_runner = None
        if request.provider is not None:
            login_runner = load_login_runner()
            if login_runner is None:
                raise RequestError(
                    "provider_unavailable",
                    f"this guest image has no login support (browservm.guest.login); cannot sign in to "
                    f"{request.provider}",
                )
        env = {**self.base_env, **request.env}
        if self.prepared is None:
            url = None if request.provider else request.start_url
            self._start_services(request.screen, request.stream, env, request.proxy, url)
        else:
            self._check_prepared_for(request)
            if request.start_url and not request.provider:
                self._in_background(self._open_start_url(request.start_url))
        self.configured = request
        if login_runner is not None:
            self._in_background(self._start_login(login_runner, request, env))
        return {"services": list(self.supervisor.statuses())}

    async def _prepare(self, connection: _Connection, request: protocol.Prepare) -> dict[str, Any]:
        self._require_role("browser", "prepare")
        if self.configured is not None or self.prepared is not None:
            raise RequestError("already_configured", "this sandbox's services already run")
        self.prepared = request
        self._start_services(request.screen, request.stream, {**self.base_env, **request.env}, None, None)
        return {"services": list(self.supervisor.statuses())}

    def _start_services(
        self,
        screen: protocol.ScreenConfig,
        stream: protocol.StreamConfig,
        env: dict[str, str],
        proxy: protocol.ProxyConfig | None,
        url: str | None,
    ) -> None:
        self.xvfb = XvfbService(screen, env)
        self.chromium = ChromiumService(
            self.xvfb, screen, self.run_dir / "chromium-profile", env, proxy, url=url
        )
        self.vnc = VncService(self.xvfb, env, self.run_dir)
        self.streamer = StreamerService(
            self.xvfb, self.run_dir / "streamer.sock", screen, stream, env, self.emit
        )
        for service in (self.xvfb, self.chromium, self.vnc, self.streamer):
            self.supervisor.start(service)

    def _check_prepared_for(self, request: protocol.Configure) -> None:
        """A prepared sandbox serves a session only as it was prepared: anything else needs a new one."""
        prepared = self.prepared
        assert prepared is not None
        differences = []
        if request.screen != prepared.screen:
            differences.append(f"screen {request.screen} (prepared {prepared.screen})")
        as_prepared = prepared.stream.model_copy(update={"ice_servers": request.stream.ice_servers})
        if request.stream != as_prepared:
            differences.append("stream settings")
        if request.proxy is not None:
            differences.append("a proxy (the browser was started without one)")
        if request.env != prepared.env:
            differences.append("environment")
        if differences:
            raise RequestError(
                "prepared_differently",
                f"this sandbox was prepared differently ({'; '.join(differences)}); create a new one",
            )

    async def _open_start_url(self, url: str) -> None:
        assert self.chromium is not None
        try:
            await self.chromium.open_url(url)
        except Exception:
            log.exception("chromium.start_url_failed", url=url)

    async def _start_login(
        self, login_runner: Callable[..., LoginRunnerLike], request: protocol.Configure, env: dict[str, str]
    ) -> None:
        assert self.xvfb is not None
        assert self.chromium is not None
        assert request.provider is not None
        try:
            # The CLI may open its browser at once: the display must exist first.
            await asyncio.wait_for(self.supervisor.wait_ready("xvfb"), LOGIN_DISPLAY_WAIT_S)
            assert self.xvfb.display is not None
            self.login = login_runner(
                request.provider,
                dict(request.provider_options),
                self.home,
                {**env, "DISPLAY": self.xvfb.display},
                self.chromium.open_url,
                self._set_login_state,
                request.login_timeout_s,
            )
            await self.login.start()
        except Exception as exc:
            log.exception("login.start_failed")
            self._set_login_state(
                protocol.LoginState(
                    state="failed", detail=f"login did not start: {type(exc).__name__}: {exc}"
                )
            )

    async def _status(self, connection: _Connection, request: protocol.Status) -> dict[str, Any]:
        services = {name: status.as_dict() for name, status in self.supervisor.statuses().items()}
        return {
            "sandbox_id": self.sandbox_id,
            "role": self.role,
            "agent_pid": os.getpid(),
            "configured": self.configured is not None,
            "prepared": self.prepared is not None,
            "services": services,
            # As this agent sees them: inside the sandbox's own PID namespace where it has one.
            "pids": {name: status["pid"] for name, status in services.items()},
            "login": self.login_state.model_dump() if self.login_state is not None else None,
            "display": self.xvfb.display if self.xvfb is not None else None,
            "devtools_port": self.chromium.devtools_port if self.chromium is not None else None,
            "vnc_port": self.vnc.port if self.vnc is not None else None,
        }

    async def _open_url(self, connection: _Connection, request: protocol.OpenUrl) -> dict[str, Any]:
        if self.chromium is None:
            raise RequestError("not_configured", "send configure first: there is no browser yet")
        try:
            await self.chromium.open_url(request.url)
        except Exception as exc:
            raise RequestError("open_url_failed", f"{type(exc).__name__}: {exc}") from exc
        return {"url": request.url}

    async def _signal(self, connection: _Connection, request: protocol.Signal) -> dict[str, Any]:
        streamer_status = self.supervisor.statuses().get("streamer")
        if (
            request.kind == "offer"
            and streamer_status
            and streamer_status.state in ("starting", "restarting")
        ):
            # A viewer reconnecting after a streamer crash waits for the restart instead of
            # getting an error that counts as a failed attempt and may push it to VNC.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.supervisor.wait_ready("streamer"), STREAMER_RESTART_WAIT_S)
        if self.streamer is None or self.streamer.link is None:
            raise RequestError("streamer_unavailable", "the streamer is not ready; retry or use VNC")
        if request.kind == "offer" and self.configured is not None:
            request = request.model_copy(update={"ice_servers": self.configured.stream.ice_servers})
        return await self.streamer.link.signal(request)

    async def _open_stream(self, connection: _Connection, request: protocol.OpenStream) -> None:
        if self.vnc is None or self.vnc.port is None:
            raise RequestError("vnc_unavailable", "x11vnc is not ready (configure first, or retry)")
        stream_id = next(self._stream_ids)
        try:
            bridge = await VncBridge.open(stream_id, self.vnc.port, self.vnc.password)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, VncAuthError) as exc:
            raise RequestError("vnc_unavailable", f"cannot connect to x11vnc: {exc}") from exc
        connection.streams[stream_id] = bridge

        async def closed(stream_id: int) -> None:
            if connection.streams.pop(stream_id, None) is not None:
                connection.send(protocol.CloseStream(stream_id=stream_id))

        # Reply first: the controller drops stream bytes for a stream id it has not been told about.
        connection.send(protocol.Reply(id=request.id, ok=True, result={"stream_id": stream_id}))
        bridge.start(connection.send_stream, closed)
        return None

    async def _write_files(self, connection: _Connection, request: protocol.WriteFiles) -> dict[str, Any]:
        self._require_role("cli", "write_files")
        written = await asyncio.to_thread(write_files, self.home, request.files)
        return {"written": written}

    async def _exec(self, connection: _Connection, request: protocol.Exec) -> dict[str, Any]:
        self._require_role("cli", "exec")
        return {"exec_id": await self.exec.start(request)}

    async def _collect_credentials(
        self, connection: _Connection, request: protocol.CollectCredentials
    ) -> dict[str, Any]:
        if self.login is None:
            raise RequestError("no_login", "no login is running in this sandbox (configure with a provider)")
        files = await self.login.collect()
        return {"files": [blob.model_dump() for blob in files]}

    async def _shutdown(self, connection: _Connection, request: protocol.Shutdown) -> dict[str, Any]:
        self.stopped.set()
        return {}

    # ------------------------------------------------------------------ lifetime

    def _in_background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop the login, the commands and every service, then drop the connection."""
        for task in list(self._background):
            task.cancel()
        if self.login is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.login.stop(), 5.0)
        await self.exec.stop()
        await self.supervisor.stop_all()
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
        if self._serving:
            # Let connection handlers see their closed sockets and end on their own: asyncio.run would
            # cancel them, and a cancelled server callback logs a spurious traceback on Python 3.11.
            await asyncio.wait(self._serving, timeout=1.0)


async def run(args: argparse.Namespace, home: Path, run_dir: Path) -> None:
    agent = Agent(args.sandbox_id, args.role, home, run_dir)
    listener = listener_for(args.listen)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopped.set)
    # Started in its own session, the agent has no terminal; a hang-up must not end it.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await listener.start(agent.handle_connection)
    log.info("agent.listening", sandbox_id=args.sandbox_id, role=args.role, listen=args.listen)
    await agent.stopped.wait()
    log.info("agent.stopping", sandbox_id=args.sandbox_id)
    await listener.close()
    await agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.guest.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sandbox-id", required=True)
    parser.add_argument("--role", choices=("browser", "cli"), required=True)
    parser.add_argument("--listen", required=True, help="unix:/path/agent.sock")
    parser.add_argument("--home", required=True, help="the user's home directory in this sandbox")
    parser.add_argument("--run-dir", required=True, help="sockets, logs and the browser profile")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    run_dir = Path(args.run_dir).resolve()
    home.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args, home, run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
