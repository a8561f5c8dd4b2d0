"""A test bed for the viewer-facing routes (signaling, WHEP, VNC bridge, ICE servers) before the whole stack
runs: the real routers in a real uvicorn on loopback, a real :class:`Channel` over a unix socket, and at
the other end a small guest that speaks the real channel protocol with a real aiortc answering peer (video
track plus the "input" data channel) and pipes ``open_stream("vnc")`` to a real TCP server.

The end-to-end tests (tests/web/) use the real controller, sandbox and streamer instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import uvicorn
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp
from fastapi import FastAPI

from browservm import protocol
from browservm.controller import errors
from browservm.controller.api import ice, signal, vnc, whep
from browservm.controller.auth import issue_viewer_token
from browservm.controller.errors import ApiError
from browservm.controller.server import uvicorn_config
from browservm.controller.viewers import LocalViewers
from browservm.sandbox.channel import Channel
from browservm.settings import Settings
from browservm.web import routes

SECRET = b"viewer-testbed-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ColourTrack(VideoStreamTrack):
    """A 320x240 green picture at 15 fps: enough for a receiver to see frames arrive."""

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(320, 240, "yuv420p")
        for plane, value in zip(frame.planes, (150, 44, 21), strict=True):
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base
        return frame


def loopback_only(sdp: str) -> str:
    """Drop a browser's candidates on the machine's real interfaces: this test bed talks only on 127/8."""
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:") and not line.split()[4].startswith("127."):
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


@dataclass
class LoopbackGuest:
    """The guest end of the channel: answers Signal with aiortc, opens VNC streams to ``vnc_port``."""

    sandbox_id: str
    vnc_port: int | None = None
    peers: dict[str, RTCPeerConnection] = field(default_factory=dict)
    input_messages: list[str] = field(default_factory=list)
    candidates_received: list[dict[str, Any] | None] = field(default_factory=list)
    offers: int = 0
    refuse_candidates: bool = False
    _channel: protocol.Peer | None = None
    _streams: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._channel = protocol.Peer(
            reader,
            writer,
            name="controller",
            handlers={protocol.Signal: self.on_signal, protocol.OpenStream: self.open_vnc},
            on_event=self.on_event,
            on_stream=self.on_stream,
        )
        capabilities = sorted(protocol.REQUIRED_CAPABILITIES["browser"] | {"webrtc"})
        self.send(
            protocol.Hello(
                agent_version="test", sandbox_id=self.sandbox_id, role="browser", capabilities=capabilities
            )
        )
        try:
            await self._channel.closed.wait()
        finally:
            await self.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send(self, message: Any) -> None:
        assert self._channel is not None
        self._channel.send(message)

    async def on_stream(self, stream_id: int, data: bytes) -> None:
        target = self._streams.get(stream_id)
        if target is not None:
            target.write(data)

    def on_event(self, message: Any) -> None:
        if isinstance(message, protocol.CloseStream):
            target = self._streams.pop(message.stream_id, None)
            if target is not None:
                target.close()

    async def on_signal(self, message: protocol.Signal) -> protocol.Answer:
        if message.kind == "offer":
            self.offers += 1
            old = self.peers.pop(message.peer_id, None)
            if old is not None:
                await old.close()
            pc = RTCPeerConnection()
            self.peers[message.peer_id] = pc
            pc.addTrack(ColourTrack())

            @pc.on("datachannel")
            def on_datachannel(channel: Any) -> None:
                channel.on("message", lambda data: self.input_messages.append(data))

            offer = loopback_only(message.sdp or "")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            return protocol.Answer(sdp=pc.localDescription.sdp)
        if message.kind == "candidate":
            self.candidates_received.append(message.candidate)
            if self.refuse_candidates:
                raise protocol.RequestError("bad_candidate", "this guest refuses trickled candidates")
            pc = self.peers.get(message.peer_id)
            text = str((message.candidate or {}).get("candidate") or "")
            if text and not text.split()[4].startswith("127."):
                return protocol.Answer()
            if pc is not None and message.candidate and message.candidate.get("candidate"):
                line = str(message.candidate["candidate"]).removeprefix("candidate:")
                candidate = candidate_from_sdp(line)
                candidate.sdpMid = message.candidate.get("sdpMid")
                candidate.sdpMLineIndex = message.candidate.get("sdpMLineIndex")
                await pc.addIceCandidate(candidate)
            return protocol.Answer()
        if message.kind == "close":
            pc = self.peers.pop(message.peer_id, None)
            if pc is not None:
                await pc.close()
        return protocol.Answer()

    async def open_vnc(self, message: protocol.OpenStream) -> protocol.StreamOpened:
        if self.vnc_port is None:
            raise protocol.RequestError("vnc_unavailable", "no VNC server in this guest")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.vnc_port)
        stream_id = len(self._streams) + 1000
        self._streams[stream_id] = writer

        async def pump() -> None:
            assert self._channel is not None
            while data := await reader.read(65536):
                await self._channel.send_stream(stream_id, data)
            self.send(protocol.CloseStream(stream_id=stream_id))

        self.spawn(pump())  # its first bytes follow the reply
        return protocol.StreamOpened(stream_id=stream_id)

    def kill_peer(self, peer_id: str) -> None:
        """The streamer lost this peer, as when it crashes: tell the controller."""
        self.spawn(self._kill(peer_id))

    async def _kill(self, peer_id: str) -> None:
        pc = self.peers.pop(peer_id, None)
        if pc is not None:
            await pc.close()
        self.send(protocol.SignalEvent(peer_id=peer_id, kind="closed"))

    async def close(self) -> None:
        for pc in list(self.peers.values()):
            await pc.close()
        self.peers.clear()
        for writer in self._streams.values():
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()


class _Sessions:
    def __init__(self, channels: dict[str, Channel]) -> None:
        self.channels = channels

    async def channel(self, session_id: str) -> Channel:
        channel = self.channels.get(session_id)
        if channel is None or channel.closed.is_set():
            raise ApiError(409, "no_sandbox", f"session {session_id} has no running browser")
        return channel


@dataclass
class Runtime:
    settings: Settings
    secret: bytes
    sessions: _Sessions
    viewers: LocalViewers = field(default_factory=LocalViewers)


@dataclass
class ViewerBed:
    url: str
    session_id: str
    token: str
    guest: LoopbackGuest
    channel: Channel
    runtime: Runtime

    def token_for(self, session_id: str, ttl_s: float = 300) -> str:
        return issue_viewer_token(SECRET, session_id, time.time() + ttl_s)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")


def viewer_app(runtime: Runtime) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    for router in (signal.router, whep.router, vnc.router, ice.router):
        app.include_router(router)
    routes.mount(app)
    app.state.services = runtime
    return app


@contextlib.asynccontextmanager
async def viewer_bed(
    settings: Settings | None = None, *, vnc_port: int | None = None
) -> AsyncIterator[ViewerBed]:
    session_id = "sess-test"
    guest = LoopbackGuest(sandbox_id="sb-test", vnc_port=vnc_port)
    directory = Path(tempfile.mkdtemp(prefix="bvm-vb-", dir="/tmp"))
    path = directory / "agent.sock"
    server = await asyncio.start_unix_server(guest.serve, path=str(path))
    reader, writer = await asyncio.open_unix_connection(str(path))
    channel = await Channel.handshake("sb-test", reader, writer)
    runtime = Runtime(
        settings or Settings(state_dir=directory / "state"), SECRET, _Sessions({session_id: channel})
    )
    port = free_port()
    # The server `browservm serve` runs, with its limits (server.uvicorn_config).
    uv = uvicorn.Server(uvicorn_config(viewer_app(runtime), runtime.settings, host="127.0.0.1", port=port))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield ViewerBed(
            url=f"http://127.0.0.1:{port}",
            session_id=session_id,
            token=issue_viewer_token(SECRET, session_id, time.time() + 300),
            guest=guest,
            channel=channel,
            runtime=runtime,
        )
    finally:
        uv.should_exit = True
        await task
        await channel.close()
        await guest.close()
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- VNC desktop


@dataclass(frozen=True)
class VncDesktop:
    display: str
    port: int

    def pointer(self) -> tuple[int, int]:
        """Where the X pointer is now (xdotool), to see that input arrived."""
        out = subprocess.run(
            ["xdotool", "getmouselocation", "--shell"],
            env={"DISPLAY": self.display}, capture_output=True, text=True, check=True, timeout=5,
        ).stdout  # fmt: skip
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return int(values["X"]), int(values["Y"])


def _free_display() -> int:
    for number in range(140, 240):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            return number
    raise RuntimeError("no free X display number between 140 and 240")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait(process: subprocess.Popen[bytes], ready: Any, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout_s} s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.02)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def vnc_desktop() -> Iterator[VncDesktop]:
    """Xvfb plus x11vnc on a loopback port: ready when the X socket exists and the RFB port accepts."""
    number = _free_display()
    work = Path(tempfile.mkdtemp(prefix="bvm-vnc-"))
    xvfb = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    vnc: subprocess.Popen[bytes] | None = None
    port = free_port()
    try:
        _wait(xvfb, Path(f"/tmp/.X11-unix/X{number}").exists, "Xvfb")
        vnc = subprocess.Popen(
            ["x11vnc", "-display", f":{number}", "-rfbport", str(port), "-localhost", "-nopw", "-forever",
             "-shared", "-noncache", "-quiet", "-o", str(work / "x11vnc.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(vnc, lambda: _port_open(port), "x11vnc")
        yield VncDesktop(f":{number}", port)
    finally:
        if vnc is not None:
            _stop(vnc)
        _stop(xvfb)
        shutil.rmtree(work, ignore_errors=True)
