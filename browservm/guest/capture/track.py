"""The video track a viewer's RTCPeerConnection sends: frames already encoded, so aiortc only packetizes."""

from __future__ import annotations

import fractions
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from browservm.guest.capture.source import Subscription

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


class EncodedVideoTrack(MediaStreamTrack):
    """A video track that yields already-encoded frames as ``av.Packet``, so aiortc only packetizes."""

    kind = "video"

    def __init__(self, subscription: Subscription) -> None:
        super().__init__()
        self.subscription = subscription

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.subscription.get()
        packet = av.Packet(frame.data)
        packet.pts = frame.capture_ns * VIDEO_CLOCK // 1_000_000_000
        packet.time_base = VIDEO_TIME_BASE
        return packet

    def stop(self) -> None:
        if not self.subscription.closed:
            self.subscription.close()
        super().stop()
