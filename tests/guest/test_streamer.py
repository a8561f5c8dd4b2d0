"""The streamer process end to end: a real Xvfb and Chromium page, the streamer started as the agent starts
it, and a Python aiortc viewer that signals through the unix-socket protocol as the agent relays it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from pydantic import BaseModel
from Xlib import X
from Xlib import display as xdisplay

from browservm import protocol
from tests.guest.desktop_testbed import Chromium, Xvfb, write_page

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1280, 720


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    server = Xvfb(WIDTH, HEIGHT)
    yield server
    server.stop()


@pytest.fixture
async def page(xvfb: Xvfb, tmp_path: Path) -> AsyncIterator[Chromium]:
    chromium = Chromium(xvfb.display, write_page(tmp_path), WIDTH, HEIGHT)
    try:
        await chromium.connect()
        yield chromium
    finally:
        await chromium.stop()


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # the viewer runs in this process; aioice skips 127.0.0.1 unless told otherwise
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class StreamerProcess:
    def __init__(
        self,
        display: str,
        directory: Path,
        codec: str = "h264",
        capture: str = "auto",
        refresh_s: float = 1.0,
    ) -> None:
        self.socket = directory / f"streamer-{codec}-{capture}.sock"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "browservm.guest.streamer",
                "--display",
                display,
                "--socket",
                str(self.socket),
                "--width",
                str(WIDTH),
                "--height",
                str(HEIGHT),
                "--fps",
                "30",
                "--codec",
                codec,
                "--min-kbps",
                "300",
                "--max-kbps",
                "4000",
                "--ice-servers",
                "[]",
                "--host-addresses",
                "127.0.0.1",
                "--refresh-s",
                str(refresh_s),
            ],
            env={**os.environ, "BROWSERVM_STREAMER_CAPTURE": capture},
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():  # the socket appears once the streamer accepts connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamer exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("streamer socket never appeared")
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Channel:
    """The agent's end of the streamer socket: requests with ids, replies matched, events queued."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: asyncio.Queue[BaseModel] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[protocol.Reply]] = {}
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, socket: Path) -> Channel:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        return cls(reader, writer)

    async def _read(self) -> None:
        while (frame := await protocol.read_frame(self.reader)) is not None:
            _, message = frame
            if isinstance(message, protocol.Reply):
                self._waiting.pop(message.id).set_result(message)
            else:
                await self.events.put(message)  # type: ignore[arg-type]

    async def request(self, build: Any, **fields: Any) -> protocol.Reply:
        ident = next(self._ids)
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.writer.write(protocol.encode_message(build(id=ident, **fields)))
        return await asyncio.wait_for(future, 15)

    async def event(self, predicate: Any, timeout: float = 10) -> BaseModel:
        async def wait() -> BaseModel:
            while True:
                message = await self.events.get()
                if predicate(message):
                    return message

        return await asyncio.wait_for(wait(), timeout)

    async def wait_ready(self) -> None:
        await self.event(lambda m: isinstance(m, protocol.ServiceState) and m.state == "ready", 20)

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()


class ViewerPeer:
    """What the viewer page does: offer recvonly video plus an ``input`` data channel."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.input = self.pc.createDataChannel("input")
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.opened = asyncio.Event()
        self.track: Any = None
        self.got_track = asyncio.Event()
        self.input.on("open", self.opened.set)
        self.input.on("message", lambda raw: self.messages.put_nowait(json.loads(raw)))

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self.track = track
            self.got_track.set()

    async def connect(self, channel: Channel, peer_id: str = "viewer-1") -> float:
        """Signal through the channel; returns seconds from sending the offer to the first decoded frame."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        started = time.monotonic()
        reply = await channel.request(
            protocol.Signal, peer_id=peer_id, kind="offer", sdp=self.pc.localDescription.sdp
        )
        assert reply.ok, reply.error
        assert reply.result["type"] == "answer"
        await self.pc.setRemoteDescription(RTCSessionDescription(**reply.result))
        await asyncio.wait_for(self.got_track.wait(), 20)
        await self.frame()
        return time.monotonic() - started

    async def frame(self) -> Any:
        return await asyncio.wait_for(self.track.recv(), 20)

    async def send(self, message: dict[str, Any]) -> None:
        await asyncio.wait_for(self.opened.wait(), 10)
        self.input.send(json.dumps(message))

    async def close(self) -> None:
        await self.pc.close()


@pytest.fixture(scope="module")
def h264_streamer(xvfb: Xvfb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamerProcess]:
    streamer = StreamerProcess(xvfb.display, tmp_path_factory.mktemp("streamer"))
    yield streamer
    assert streamer.stop() == 0  # SIGTERM is a clean stop


@pytest.fixture
async def channel(h264_streamer: StreamerProcess) -> AsyncIterator[Channel]:
    chan = await Channel.open(h264_streamer.socket)
    yield chan
    await chan.close()


@pytest.fixture
async def viewer() -> AsyncIterator[ViewerPeer]:
    peer = ViewerPeer()
    yield peer
    await peer.close()


def brightness_at(frame: Any, x: int, y: int) -> int:
    """Mean luma of a 10x10 block around x,y (no numpy in the venv: read the Y plane directly)."""
    gray = frame.reformat(format="gray")
    plane = gray.planes[0]
    data, stride = bytes(plane), plane.line_size
    values = [data[row * stride + col] for row in range(y - 5, y + 5) for col in range(x - 5, x + 5)]
    return sum(values) // len(values)


async def test_h264_stream_reaches_a_viewer_and_its_clicks_reach_the_page(
    page: Chromium, channel: Channel, viewer: ViewerPeer
) -> None:
    first = await channel.events.get()  # every connection starts with the streamer's state
    assert isinstance(first, protocol.ServiceState)
    assert first.service == "streamer"
    if first.state != "ready":
        await channel.wait_ready()

    ttff = await viewer.connect(channel)
    assert ttff < 10  # the figure itself is bench/stream.py's; this only says a frame came
    frame = await viewer.frame()
    assert (frame.width, frame.height) == (WIDTH, HEIGHT)
    await channel.event(lambda m: isinstance(m, protocol.SignalEvent) and m.kind == "connected")

    await viewer.send({"t": "ping", "ts": 42})
    assert await asyncio.wait_for(viewer.messages.get(), 5) == {"t": "pong", "ts": 42}

    swatch = json.loads(await page.evaluate("rectOf('swatch')"))
    assert brightness_at(await viewer.frame(), swatch["x"], swatch["y"]) < 60  # black before the click
    bx, by = await page.center_of("btn")
    await viewer.send({"t": "down", "button": 1, "x": bx, "y": by})
    await viewer.send({"t": "up", "button": 1, "x": bx, "y": by})
    await page.wait_for(lambda s: s["clicks"] == 1)
    # the click shows in the video: the swatch turns white
    deadline = time.monotonic() + 5
    while brightness_at(await viewer.frame(), swatch["x"], swatch["y"]) < 200:
        assert time.monotonic() < deadline, "the click never showed in the video"

    status = await channel.request(protocol.Status)
    assert status.result["capture"] == "pixelflux"
    assert status.result["viewers"] == 1

    assert (await channel.request(protocol.Signal, peer_id="viewer-1", kind="close")).ok
    await channel.event(lambda m: isinstance(m, protocol.SignalEvent) and m.kind == "closed")
    assert (await channel.request(protocol.Status)).result["viewers"] == 0


async def test_clipboard_round_trip_over_the_data_channel(
    xvfb: Xvfb, page: Chromium, channel: Channel, viewer: ViewerPeer
) -> None:
    await viewer.connect(channel, "clip")
    ix, iy = await page.center_of("inp")
    for _ in range(10):  # a window mapped a moment ago may miss the first click; focusing is idempotent
        await viewer.send({"t": "down", "button": 1, "x": ix, "y": iy})
        await viewer.send({"t": "up", "button": 1, "x": ix, "y": iy})
        with contextlib.suppress(AssertionError):
            await page.wait_for(lambda s: s["focused"] == "inp", timeout=0.5)
            break
    await page.wait_for(lambda s: s["focused"] == "inp")
    await viewer.send({"t": "clipboard", "text": "sk-paste-✓"})
    await viewer.send({"t": "ping", "ts": 1})  # messages are ordered: after the pong, the text is queued
    assert (await asyncio.wait_for(viewer.messages.get(), 5))["t"] == "pong"
    # the clipboard bridge takes the selection on its own thread: wait until the X server names an owner
    probe = xdisplay.Display(xvfb.display)
    while probe.get_selection_owner(probe.intern_atom("CLIPBOARD")) == X.NONE:
        await asyncio.sleep(0.01)
    probe.close()
    for key, down in (("Control", True), ("v", True), ("v", False), ("Control", False)):
        await viewer.send({"t": "key", "key": key, "code": "", "down": down})
    await page.wait_for(lambda s: s["text"] == "sk-paste-✓")

    await page.evaluate(
        "document.getElementById('copy').value = 'copied remotely'; "
        "document.getElementById('copy').focus(); document.getElementById('copy').select(); 0"
    )
    for key, down in (("Control", True), ("c", True), ("c", False), ("Control", False)):
        await viewer.send({"t": "key", "key": key, "code": "", "down": down})
    message = await asyncio.wait_for(viewer.messages.get(), 5)
    assert message == {"t": "clipboard", "text": "copied remotely"}

    await viewer.send({"t": "bogus"})  # ignored, never fatal
    await viewer.send({"t": "ping", "ts": "still alive"})
    assert await asyncio.wait_for(viewer.messages.get(), 5) == {"t": "pong", "ts": "still alive"}


async def test_second_offer_for_a_peer_replaces_it(channel: Channel) -> None:
    first, second = ViewerPeer(), ViewerPeer()
    try:
        await first.connect(channel, "same")
        await second.connect(channel, "same")
        deadline = time.monotonic() + 10
        while first.pc.connectionState not in ("closed", "failed"):
            assert time.monotonic() < deadline, f"old peer still {first.pc.connectionState}"
            await asyncio.sleep(0.05)
        frame = await second.frame()
        assert (frame.width, frame.height) == (WIDTH, HEIGHT)
        assert (await channel.request(protocol.Status)).result["viewers"] == 1
        bad = await channel.request(
            protocol.Signal,
            peer_id="nobody",
            kind="candidate",
            candidate={"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"},
        )
        assert not bad.ok
        assert bad.error is not None
        assert bad.error.code == "unknown_peer"
        # a trickled candidate (here one of the viewer's own, already in its offer) is applied
        line = next(
            line[2:]
            for line in second.pc.localDescription.sdp.splitlines()
            if line.startswith("a=candidate:")
        )
        trickled = await channel.request(
            protocol.Signal,
            peer_id="same",
            kind="candidate",
            candidate={"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0},
        )
        assert trickled.ok, trickled.error
        end = await channel.request(protocol.Signal, peer_id="same", kind="candidate", candidate=None)
        assert end.ok  # end-of-candidates is accepted
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(("codec", "capture"), [("vp8", "auto"), ("h264", "x11grab")])
async def test_other_codec_and_fallback_capture_stream(
    xvfb: Xvfb, tmp_path: Path, codec: str, capture: str
) -> None:
    streamer = StreamerProcess(xvfb.display, tmp_path, codec=codec, capture=capture)
    peer = ViewerPeer()
    chan = await Channel.open(streamer.socket)
    try:
        await chan.wait_ready()
        await peer.connect(chan)
        frame = await peer.frame()
        assert (frame.width, frame.height) == (WIDTH, HEIGHT)
        status = (await chan.request(protocol.Status)).result
        assert status["codec"] == codec
        assert status["capture"] == ("pixelflux" if capture == "auto" else "x11grab")
    finally:
        await peer.close()
        await chan.close()
        assert streamer.stop() == 0
