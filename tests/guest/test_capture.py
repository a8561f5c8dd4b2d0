"""Capture sources on a real Xvfb: the first frame a viewer gets decodes on its own, in both codecs and
both sources, and the bitrate stays within the stream's bounds; a still screen costs about a frame a
second, and a click's answer on a still page reaches a real aiortc viewer at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import av
import pytest

from browservm import protocol
from browservm.guest.capture import CaptureConfig, EncodedVideoTrack, create_source, is_keyframe
from tests.guest.desktop_testbed import Chromium, Xvfb, write_page
from tests.guest.streamer_testbed import HEIGHT, WIDTH, Channel, StreamerProcess, ViewerPeer, brightness_at

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("loopback_ice")]


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    server = Xvfb(640, 480)
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("kind", "codec"), [("pixelflux", "h264"), ("pixelflux", "vp8"), ("x11grab", "h264"), ("x11grab", "vp8")]
)
async def test_a_new_viewer_starts_on_a_decodable_keyframe(
    xvfb: Xvfb, kind: Literal["pixelflux", "x11grab"], codec: Literal["h264", "vp8"]
) -> None:
    source = create_source(kind, CaptureConfig(xvfb.display, 640, 480, 30, codec, 300, 2000))
    await source.start()
    try:
        await asyncio.wait_for(source.first_frame.wait(), 5)
        track = EncodedVideoTrack(source.subscribe())
        packet = await asyncio.wait_for(track.recv(), 5)
        assert is_keyframe(codec, bytes(packet))
        decoder = av.CodecContext.create("h264" if codec == "h264" else "libvpx", "r")
        frames = decoder.decode(packet)
        assert [(f.width, f.height) for f in frames] == [(640, 480)]

        source.set_bitrate(50_000)  # a receiver's estimate above the bound is clamped
        assert source.bitrate_kbps == 2000
        source.set_bitrate(10)
        assert source.bitrate_kbps == 300
        track.stop()
        assert source.viewers == 0
    finally:
        source.stop()


def test_keyframe_detection() -> None:
    sps_pps_idr = b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x00\x01\x68\xce" + b"\x00\x00\x01\x65\x88"
    assert is_keyframe("h264", sps_pps_idr)
    assert not is_keyframe("h264", b"\x00\x00\x00\x01\x41\x9a")
    assert not is_keyframe("h264", b"")
    assert is_keyframe("vp8", b"\x30\xc7\x00\x9d\x01\x2a")
    assert not is_keyframe("vp8", b"\x31\x1d\x00")


async def test_a_still_screen_costs_a_frame_a_second_and_input_gets_a_fresh_frame(xvfb: Xvfb) -> None:
    source = create_source("pixelflux", CaptureConfig(xvfb.display, 640, 480, 30, "h264", 300, 2000))
    await source.start()
    try:
        track = EncodedVideoTrack(source.subscribe())
        assert is_keyframe("h264", bytes(await asyncio.wait_for(track.recv(), 5)))
        # the bare Xvfb never changes: after the keyframe's settling frames, only the refresh remains
        await asyncio.sleep(1.5)
        settled = source.frames
        await asyncio.sleep(2.0)
        assert 1 <= source.frames - settled <= 4, "a still screen should encode about one frame a second"

        source.refresh_s = 5.0  # from here, a frame within 2.5 s can only be input's own
        while track.subscription.pending:
            await track.recv()
        source.note_input()  # the viewer clicked: a fresh frame follows even if nothing changed
        await asyncio.wait_for(track.recv(), 2.5)
        track.stop()
    finally:
        source.stop()


async def test_a_click_on_a_still_page_shows_at_once_on_a_strict_receiver(tmp_path: Path) -> None:
    """The case that once looked like a missed change: on a still page, a click's answer is the last frame
    encoded, and aiortc's receiver completes a frame only when the next one starts. The streamer must
    follow it with another frame, so the answer shows within a fraction of a second (not at the next
    refresh, which the streamer here makes 5 s)."""
    display = Xvfb(WIDTH, HEIGHT)
    page = Chromium(display.display, write_page(tmp_path), WIDTH, HEIGHT)
    streamer = None
    viewer = ViewerPeer()
    channel = None
    try:
        await page.connect()
        streamer = StreamerProcess(display.display, tmp_path, refresh_s=5.0)
        channel = await Channel.open(streamer.socket)
        await channel.wait_ready()
        await viewer.connect(channel)
        swatch = json.loads(await page.evaluate("rectOf('swatch')"))
        bx, by = await page.center_of("btn")
        frames_before = (await channel.request(protocol.StreamStatus())).frames
        await asyncio.sleep(1.5)
        frames_still = (await channel.request(protocol.StreamStatus())).frames - frames_before
        assert frames_still <= 15, f"{frames_still} frames encoded in 1.5 s of a still page"
        assert brightness_at(await viewer.frame(), swatch["x"], swatch["y"]) < 60
        with contextlib.suppress(TimeoutError):  # start from the newest picture: take what has come
            while True:
                await asyncio.wait_for(viewer.track.recv(), 0.2)

        clicked = time.monotonic()
        await viewer.send({"t": "down", "button": 1, "x": bx, "y": by})
        await viewer.send({"t": "up", "button": 1, "x": bx, "y": by})
        while brightness_at(await viewer.frame(), swatch["x"], swatch["y"]) < 200:
            assert time.monotonic() - clicked < 6, "the click's answer never showed"
        shown_after = time.monotonic() - clicked
        assert (await page.state())["clicks"] == 1
        # without a frame after the answer it would wait for the next refresh (5 s) or change; the figure
        # on an idle machine is ~60 ms (bench/stream.py), the bound leaves room for a busy one
        assert shown_after < 2.5, f"the click showed after {shown_after * 1000:.0f} ms"
    finally:
        await viewer.close()
        if channel is not None:
            await channel.close()
        if streamer is not None:
            assert streamer.stop() == 0
        await page.stop()
        display.stop()
