"""Capture and encode the guest's X display once, and fan the encoded frames out to every viewer.

Two sources produce the same thing, :class:`EncodedFrame` (one access unit of H.264 Annex-B or one VP8
frame):

* :class:`PixelfluxSource` (``pixelflux.py``): pixelflux 2.2.1 (selkies' Rust capture+encode) over XShm
  with x264 or libvpx. It encodes only when the screen changed (pixelflux's change detection), streams
  every frame for a moment after each input event, and always sends one more frame shortly after a change
  and one a second on a still screen (see :class:`PixelfluxSource`). ``request_idr_frame()`` yields a
  keyframe with the next frame, on a still screen too.
* :class:`X11GrabSource` (``x11grab.py``): the fallback, PyAV's ``x11grab`` input and PyAV's
  libx264/libvpx encoders on a thread, with the settings aiortc's own encoders lack on a small box (x264
  ``ultrafast`` and ``zerolatency``, VP8 on two threads in realtime mode, bitrate within the stream's
  bounds).

Every source takes one :class:`CaptureConfig` (display, size, rate, codec, bitrate bounds, refresh).

Encoding happens once per session, not once per viewer: each viewer's :class:`EncodedVideoTrack` yields
``av.Packet`` objects, so aiortc's ``RTCRtpSender`` only packetizes them (``encoder.pack``). A viewer that
joins, or falls behind, waits for the next keyframe and asks the source for one.

The cursor is drawn into the frames by the capture (pixelflux ``capture_cursor``, x11grab ``draw_mouse``),
so the viewer needs no cursor of its own.
"""

from __future__ import annotations

from typing import Literal

from browservm.guest.capture.frame import Codec, EncodedFrame, is_keyframe
from browservm.guest.capture.pixelflux import PixelfluxSource
from browservm.guest.capture.source import (
    REFRESH_S,
    CaptureConfig,
    CaptureUnavailable,
    Subscription,
    VideoSource,
)
from browservm.guest.capture.track import EncodedVideoTrack
from browservm.guest.capture.x11grab import X11GrabSource

__all__ = [
    "REFRESH_S",
    "CaptureConfig",
    "CaptureUnavailable",
    "Codec",
    "EncodedFrame",
    "EncodedVideoTrack",
    "PixelfluxSource",
    "Subscription",
    "VideoSource",
    "X11GrabSource",
    "create_source",
    "is_keyframe",
]


def create_source(kind: Literal["pixelflux", "x11grab"], config: CaptureConfig) -> VideoSource:
    return PixelfluxSource(config) if kind == "pixelflux" else X11GrabSource(config)
