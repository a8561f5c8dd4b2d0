"""What a capture source produces: one encoded access unit, and whether it decodes on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Codec = Literal["h264", "vp8"]


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    data: bytes
    capture_ns: int
    """CLOCK_MONOTONIC nanoseconds when the picture was grabbed (``time.monotonic_ns`` clock)."""
    keyframe: bool


def is_keyframe(codec: Codec, data: bytes) -> bool:
    """Whether ``data`` decodes on its own: an H.264 access unit holding an IDR slice, or a VP8 key frame."""
    if codec == "vp8":
        return len(data) > 0 and data[0] & 0x01 == 0  # VP8 frame tag bit 0: 0 = key frame
    start = 0
    while True:
        start = data.find(b"\x00\x00\x01", start)
        if start < 0 or start + 3 >= len(data):
            return False
        nal_type = data[start + 3] & 0x1F
        if nal_type == 5:
            return True
        if nal_type in (1, 2, 3, 4):  # a non-IDR slice comes first: not a keyframe
            return False
        start += 3
