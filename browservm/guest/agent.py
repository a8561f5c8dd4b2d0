"""The guest agent: the channel server inside every sandbox (``python -m browservm.guest.agent``).

It listens on the channel endpoint and the controller connects. Each new connection gets ``Hello``, then a
snapshot of the current state (each service's latest ``ServiceState`` and the latest ``LoginState``), then
requests are served. One controller at a time: a new connection replaces the old one, which is how a
restarted controller adopts a running sandbox. The agent outlives its controller, for a while: it stops
on ``shutdown`` or SIGTERM, and by itself (:mod:`~browservm.guest.watchdog`) when no controller has spoken
to it for ``--idle-timeout-s`` or its session is past the expiry the controller gave; it stops every
service first.

Roles: a ``browser`` sandbox runs the display services (Xvfb, Chromium, x11vnc, the WebRTC streamer) under
the :class:`~browservm.guest.supervisor.Supervisor` and the provider's login; a ``cli`` sandbox writes
files into the user's home and runs commands there.

This module imports only :mod:`browservm.protocol`, ``browservm.guest`` and third-party libraries: it runs
with the guest image's own Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import importlib.util
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import structlog
from pydantic import BaseModel

from browservm import protocol
from browservm.guest.connection import ControllerConnection
from browservm.guest.display import ChromiumService, XvfbService
from browservm.guest.exec import ExecRunner
from browservm.guest.files import read_files, write_files
from browservm.guest.listener import listener_for
from browservm.guest.streamer_service import StreamerService
from browservm.guest.supervisor import Supervisor
from browservm.guest.vnc import VncAuthError, VncBridge, VncService
from browservm.guest.watchdog import DEFAULT_IDLE_TIMEOUT_S, Watchdog

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"
STREAMER_RESTART_WAIT_S = 10.0
"""How long an offer waits for a (re)starting streamer; the controller gives an offer 20 s in all."""
LOGIN_DISPLAY_WAIT_S = 60.0

RequestError = protocol.RequestError


# ---------------------------------------------------------------------------------------------- login


def proxy_env(proxy: protocol.ProxyConfig | None) -> dict[str, str]:
    """The variables that send a CLI's traffic through the session's proxy (with its credentials in the
    URL, the one form every client reads; the environment, never the command line), its own loopback
    (the sign-in callback) excepted."""
    if proxy is None:
        return {}
    scheme, _, rest = proxy.url.partition("://")
    userinfo = ""
    if proxy.username is not None:
        userinfo = quote(proxy.username, safe="")
        if proxy.password is not None:
            userinfo += ":" + quote(proxy.password, safe="")
        userinfo += "@"
    url = f"{scheme}://{userinfo}{rest}"
    bypass = ",".join(proxy.bypass)
    env = {name: url for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    env.update(NO_PROXY=bypass, no_proxy=bypass, NODE_USE_ENV_PROXY="1")
    if scheme == "socks5":
        env.update(ALL_PROXY=url, all_proxy=url)
    return env


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


# ---------------------------------------------------------------------------------------------- agent


class Agent:
    def __init__(
        self,
        sandbox_id: str,
        role: protocol.Role,
        home: Path,
        run_dir: Path,
        *,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.role = role
        self.home = home
        self.run_dir = run_dir
        self.base_env = {**os.environ, "HOME": str(home)}
        self.supervisor = Supervisor(run_dir / "logs", self.emit)
        self.exec = ExecRunner(home, self.base_env)
        self.stopped = asyncio.Event()
        self.watchdog = Watchdog(idle_timeout_s, self._last_heard, self._stop_by_watchdog)
        self._heard = time.monotonic()
        """When the last connection that ended had last heard from its controller."""
        self.connection: ControllerConnection | None = None
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

    def _handlers(
        self, connection: ControllerConnection
    ) -> dict[type[protocol.Request[Any]], protocol.Handler]:
        return {
            protocol.Configure: self._configure,
            protocol.Prepare: self._prepare,
            protocol.Status: self._status,
            protocol.Ping: self._ping,
            protocol.OpenUrl: self._open_url,
            protocol.Signal: self._signal,
            protocol.OpenStream: functools.partial(self._open_stream, connection),
            protocol.WriteFiles: self._write_files,
            protocol.ReadFiles: self._read_files,
            protocol.Exec: functools.partial(self._exec, connection),
            protocol.CollectCredentials: self._collect_credentials,
            protocol.Shutdown: self._shutdown,
        }

    @property
    def hello(self) -> protocol.Hello:
        if self.role == "browser":
            capabilities = ["display", "vnc", "prepare"]
            # Offered only where this image has the module: the controller refuses an agent without login,
            # and without webrtc its viewers use VNC.
            for capability, module in (
                ("webrtc", "browservm.guest.streamer"),
                ("login", "browservm.guest.login"),
            ):
                if importlib.util.find_spec(module) is not None:
                    capabilities.append(capability)
        else:
            capabilities = ["exec", "files"]
        return protocol.Hello(
            agent_version=AGENT_VERSION,
            sandbox_id=self.sandbox_id,
            role=self.role,
            capabilities=capabilities,
            idle_timeout_s=self.watchdog.idle_timeout_s,
        )

    def emit(self, message: BaseModel) -> None:
        """Send an event to the controller connected now; with none connected, the snapshot covers it."""
        if self.connection is not None:
            self.connection.peer.send(message)

    def _set_login_state(self, state: protocol.LoginState) -> None:
        self.login_state = state
        self.emit(state)

    # ------------------------------------------------------------------ connections

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this_task = asyncio.current_task()
        if this_task is not None:
            self._serving.add(this_task)
            this_task.add_done_callback(self._serving.discard)
        self._take_identity()
        connection = ControllerConnection(reader, writer, self._handlers, self._on_event)
        # Hello and the snapshot are queued before this connection can receive any event (no await in
        # between): the controller's handshake needs Hello first.
        connection.peer.send(self.hello)
        for state in self.supervisor.states():
            connection.peer.send(state)
        if self.login_state is not None:
            connection.peer.send(self.login_state)
        previous, self.connection = self.connection, connection
        if previous is not None:
            log.info("agent.connection_replaced")
            await previous.close()
        await connection.peer.closed.wait()
        log.info("agent.connection_ended", why=connection.peer.why_closed)
        self.exec.detach(connection.peer)  # their output had one reader, and it is gone
        self._heard = max(self._heard, connection.peer.last_heard)
        if self.connection is connection:
            self.connection = None
            await connection.close()

    def _take_identity(self) -> None:
        """A VM restored from a snapshot is another sandbox than the one saved: its root helper
        (:mod:`browservm.guest.identity`) wrote the new id before the host let a controller connect."""
        try:
            sandbox_id = json.loads((self.run_dir / "identity").read_text())["sandbox_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if isinstance(sandbox_id, str) and sandbox_id != self.sandbox_id:
            log.info("agent.identity", sandbox_id=sandbox_id, was=self.sandbox_id)
            self.sandbox_id = sandbox_id

    def _last_heard(self) -> float:
        if self.connection is not None:
            return max(self._heard, self.connection.peer.last_heard)
        return self._heard

    def _stop_by_watchdog(self, why: str) -> None:
        log.warning("agent.ending_itself", sandbox_id=self.sandbox_id, why=why)
        self.stopped.set()

    def _require_role(self, role: protocol.Role, what: str) -> None:
        if self.role != role:
            raise RequestError("wrong_role", f"{what} needs a {role} sandbox; this one is {self.role}")

    # ------------------------------------------------------------------ requests

    async def _configure(self, request: protocol.Configure) -> protocol.ServicesStarted:
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
        env = self.base_env
        if self.prepared is None:
            url = None if request.provider else request.start_url
            self._start_services(request.screen, request.stream, request.debug, request.proxy, url)
        else:
            self._check_prepared_for(request)
            assert self.chromium is not None
            if request.proxy is not None:
                # Before any page of the session opens: its context goes through the user's proxy.
                await self.chromium.use_proxy(request.proxy)
            if request.start_url and not request.provider:
                self._in_background(self._open_start_url(request.start_url))
        self.configured = request
        if request.expires_in_s is not None:
            self.watchdog.expire_in(request.expires_in_s)
        if login_runner is not None:
            self._in_background(self._start_login(login_runner, request, env))
        return protocol.ServicesStarted(services=list(self.supervisor.statuses()))

    async def _prepare(self, request: protocol.Prepare) -> protocol.ServicesStarted:
        self._require_role("browser", "prepare")
        if self.configured is not None or self.prepared is not None:
            raise RequestError("already_configured", "this sandbox's services already run")
        self.prepared = request
        self._start_services(request.screen, request.stream, request.debug, None, None)
        return protocol.ServicesStarted(services=list(self.supervisor.statuses()))

    def _start_services(
        self,
        screen: protocol.ScreenConfig,
        stream: protocol.StreamConfig,
        debug: protocol.Debug,
        proxy: protocol.ProxyConfig | None,
        url: str | None,
    ) -> None:
        env = self.base_env
        self.xvfb = XvfbService(screen, env)
        self.chromium = ChromiumService(
            self.xvfb,
            screen,
            self.run_dir / "chromium-profile",
            env,
            proxy,
            url=url,
            debug_port=debug.devtools_port,
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
        as_prepared = prepared.stream.model_copy(
            update={"ice_servers": request.stream.ice_servers, "media": request.stream.media}
        )
        if request.stream != as_prepared:
            differences.append("stream settings")
        if request.debug != prepared.debug:
            differences.append(f"debug switches {request.debug} (prepared {prepared.debug})")
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
                {**env, "DISPLAY": self.xvfb.display, **proxy_env(request.proxy)},
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

    async def _status(self, request: protocol.Status) -> protocol.AgentStatus:
        return protocol.AgentStatus(
            sandbox_id=self.sandbox_id,
            role=self.role,
            agent_pid=os.getpid(),
            configured=self.configured is not None,
            prepared=self.prepared is not None,
            services={name: status.report() for name, status in self.supervisor.statuses().items()},
            login=self.login_state,
            display=self.xvfb.display if self.xvfb is not None else None,
            devtools_port=self.chromium.devtools_port if self.chromium is not None else None,
            vnc_port=self.vnc.port if self.vnc is not None else None,
        )

    async def _ping(self, request: protocol.Ping) -> protocol.Ack:
        return protocol.Ack()

    async def _open_url(self, request: protocol.OpenUrl) -> protocol.UrlOpened:
        if self.chromium is None:
            raise RequestError("not_configured", "send configure first: there is no browser yet")
        try:
            await self.chromium.open_url(request.url)
        except Exception as exc:
            raise RequestError("open_url_failed", f"{type(exc).__name__}: {exc}") from exc
        return protocol.UrlOpened(url=request.url)

    async def _signal(self, request: protocol.Signal) -> protocol.Answer:
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
            stream = self.configured.stream
            request = request.model_copy(update={"ice_servers": stream.ice_servers, "media": stream.media})
        return await self.streamer.link.signal(request)

    async def _open_stream(
        self, connection: ControllerConnection, request: protocol.OpenStream
    ) -> protocol.StreamOpened:
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
                connection.peer.send(protocol.CloseStream(stream_id=stream_id))

        # The bridge's first bytes go out after this handler's reply (the peer queues the reply before
        # the bridge's task runs): the controller drops bytes for a stream it has not been told about.
        bridge.start(connection.peer.send_stream, closed)
        return protocol.StreamOpened(stream_id=stream_id)

    async def _read_files(self, request: protocol.ReadFiles) -> protocol.FilesRead:
        self._require_role("cli", "read_files")
        return protocol.FilesRead(files=await asyncio.to_thread(read_files, self.home, request.paths))

    async def _write_files(self, request: protocol.WriteFiles) -> protocol.FilesWritten:
        self._require_role("cli", "write_files")
        written = await asyncio.to_thread(write_files, self.home, request.files)
        return protocol.FilesWritten(written=written)

    async def _exec(self, connection: ControllerConnection, request: protocol.Exec) -> protocol.ExecStarted:
        self._require_role("cli", "exec")
        return protocol.ExecStarted(exec_id=await self.exec.start(request, connection.peer))

    def _on_event(self, message: BaseModel) -> None:
        """What a controller tells the agent without asking: exec flow control."""
        if isinstance(message, protocol.ExecCredit):
            self.exec.grant(message.exec_id, message.bytes)
        elif isinstance(message, protocol.ExecClose):
            self.exec.close_output(message.exec_id)

    async def _collect_credentials(self, request: protocol.CollectCredentials) -> protocol.Credentials:
        if self.login is None:
            raise RequestError("no_login", "no login is running in this sandbox (configure with a provider)")
        return protocol.Credentials(files=await self.login.collect())

    async def _shutdown(self, request: protocol.Shutdown) -> protocol.Ack:
        self.stopped.set()
        return protocol.Ack()

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
            connection, self.connection = self.connection, None
            await connection.close()
        if self._serving:
            # Let connection handlers see their closed sockets and end on their own: asyncio.run would
            # cancel them, and a cancelled server callback logs a spurious traceback on Python 3.11.
            await asyncio.wait(self._serving, timeout=1.0)


async def run(args: argparse.Namespace, home: Path, run_dir: Path) -> None:
    agent = Agent(args.sandbox_id, args.role, home, run_dir, idle_timeout_s=args.idle_timeout_s or None)
    listener = listener_for(args.listen)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopped.set)
    # Started in its own session, the agent has no terminal; a hang-up must not end it.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await listener.start(agent.handle_connection)
    log.info("agent.listening", sandbox_id=args.sandbox_id, role=args.role, listen=args.listen)
    watchdog = asyncio.create_task(agent.watchdog.run(), name="watchdog")
    await agent.stopped.wait()
    watchdog.cancel()
    log.info("agent.stopping", sandbox_id=args.sandbox_id)
    await listener.close()
    await agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.guest.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sandbox-id", required=True)
    parser.add_argument("--role", choices=("browser", "cli"), required=True)
    parser.add_argument(
        "--listen", required=True, help="unix:/path/agent.sock, serial:/dev/virtio-ports/NAME or vsock:PORT"
    )
    parser.add_argument("--home", required=True, help="the user's home directory in this sandbox")
    parser.add_argument("--run-dir", required=True, help="sockets, logs and the browser profile")
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="end this sandbox when no controller has spoken to it for this long (0: never, for debugging)",
    )
    args = parser.parse_args(argv)
    if args.idle_timeout_s < 0:
        parser.error("--idle-timeout-s must be 0 (never) or a number of seconds")
    home = Path(args.home).resolve()
    run_dir = Path(args.run_dir).resolve()
    home.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args, home, run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
