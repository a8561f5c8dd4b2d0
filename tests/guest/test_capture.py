"""Capture sources on a real Xvfb: the first frame a viewer gets decodes on its own, in both codecs and
both sources, and the bitrate stays within the stream's bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

import av
import pytest

from browservm.guest.capture import EncodedVideoTrack, create_source, is_keyframe
from tests.guest.desktop_testbed import Xvfb

pytestmark = pytest.mark.browser


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
    source = create_source(kind, xvfb.display, 640, 480, 30, codec, 300, 2000)
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
