"""The streamer process end to end: a real Xvfb and Chromium page, the streamer started as the agent starts
it, and a Python aiortc viewer that signals through the unix-socket protocol as the agent relays it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from Xlib import X
from Xlib import display as xdisplay

from browservm import protocol
from browservm.guest.screen_size import ScreenSizer
from browservm.guest.vnc import free_loopback_port
from tests.guest.desktop_testbed import Chromium, Xvfb, write_page
from tests.guest.streamer_testbed import HEIGHT, WIDTH, Channel, StreamerProcess, ViewerPeer, brightness_at

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("loopback_ice")]


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

    status = await channel.request(protocol.StreamStatus())
    assert status.capture == "pixelflux"
    assert status.viewers == 1

    await channel.request(protocol.Signal(peer_id="viewer-1", kind="close"))
    await channel.event(lambda m: isinstance(m, protocol.SignalEvent) and m.kind == "closed")
    assert (await channel.request(protocol.StreamStatus())).viewers == 0


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
        assert (await channel.request(protocol.StreamStatus())).viewers == 1
        with pytest.raises(protocol.RequestError) as bad:
            await channel.request(
                protocol.Signal(
                    peer_id="nobody",
                    kind="candidate",
                    candidate={"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"},
                )
            )
        assert bad.value.code == "unknown_peer"
        # a trickled candidate (here one of the viewer's own, already in its offer) is applied
        line = next(
            line[2:]
            for line in second.pc.localDescription.sdp.splitlines()
            if line.startswith("a=candidate:")
        )
        trickled = await channel.request(
            protocol.Signal(
                peer_id="same",
                kind="candidate",
                candidate={"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0},
            )
        )
        assert trickled.sdp is None  # applied: a candidate's answer carries nothing
        # end-of-candidates is accepted (a refusal would raise)
        await channel.request(protocol.Signal(peer_id="same", kind="candidate", candidate=None))
    finally:
        await first.close()
        await second.close()


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_media_mapping_is_advertised_to_one_viewer_at_a_time(channel: Channel) -> None:
    """The sandbox's mapped port (here on loopback, with no NAT in between) is the first viewer's; a
    second viewer meanwhile goes without it (TURN, in production), and it is free again afterwards."""
    port = free_loopback_port()
    media = protocol.MediaMapping(
        public_ip="127.0.0.1", public_port=port, guest_address="127.0.0.1", guest_port=port
    )
    mapped = f"127.0.0.1 {port} typ host"
    first, second, third = ViewerPeer(), ViewerPeer(), ViewerPeer()
    try:
        await first.connect(channel, "first", media=media)
        assert mapped in first.answer
        assert not _udp_free(port), "the streamer holds no socket on the mapped port"
        await second.connect(channel, "second", media=media)
        assert mapped not in second.answer, "two viewers were given one mapped port"
        await first.close()
        await channel.request(protocol.Signal(peer_id="first", kind="close"))
        await third.connect(channel, "third", media=media)
        assert mapped in third.answer, "the mapped port was not freed with its viewer"
    finally:
        for peer in (first, second, third):
            await peer.close()


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
        status = await chan.request(protocol.StreamStatus())
        assert status.codec == codec
        assert status.capture == ("pixelflux" if capture == "auto" else "x11grab")
    finally:
        await peer.close()
        await chan.close()
        assert streamer.stop() == 0


async def test_the_screen_follows_a_viewers_size_and_the_stream_with_it(tmp_path: Path) -> None:
    """A viewer's area settles at a phone's size: the screen (RandR) and the capture follow, and the
    viewer decodes frames of that size; a size past the bounds is clamped."""
    display = Xvfb(1920, 1080)  # created at the largest size, as the agent's Xvfb is
    streamer = None
    viewer = ViewerPeer()
    channel = None
    try:
        sizer = ScreenSizer(display.display)
        sizer.resize(WIDTH, HEIGHT)
        sizer.close()
        streamer = StreamerProcess(display.display, tmp_path, max_size=(1920, 1080))
        channel = await Channel.open(streamer.socket)
        await channel.wait_ready()
        await viewer.connect(channel)
        assert ((await viewer.frame()).width, (await viewer.frame()).height) == (WIDTH, HEIGHT)

        for asked, expected in [((390, 641), (390, 640)), ((4000, 3000), (1920, 1080))]:
            await viewer.send({"t": "resize", "width": asked[0], "height": asked[1]})
            async with asyncio.timeout(15):
                while True:
                    status = await channel.request(protocol.StreamStatus())
                    if (status.width, status.height) == expected:
                        break
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(15):  # the viewer decodes the new size from the next keyframe
                while ((frame := await viewer.frame()).width, frame.height) != expected:
                    pass
    finally:
        await viewer.close()
        if channel is not None:
            await channel.close()
        if streamer is not None:
            assert streamer.stop() == 0
        display.stop()
