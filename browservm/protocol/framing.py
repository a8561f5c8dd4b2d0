"""Frames: how messages and raw stream bytes share one byte stream.

::

    +----------------+--------+------------------------------+
    | length: u32 BE | kind:u8| payload (length - 1 bytes)   |
    +----------------+--------+------------------------------+

* ``kind == FRAME_MESSAGE``: the payload is one JSON message (UTF-8).
* ``kind == FRAME_STREAM``: the payload is ``stream_id: u32 BE`` followed by raw bytes of that stream.

:func:`read_frame` hands a message's payload over undecoded, so that a reader can still answer a request
it cannot parse (its id is only recoverable from the raw JSON).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel

FRAME_MESSAGE: Final = 0x01
FRAME_STREAM: Final = 0x02
MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error, not an allocation."""

_HEADER = struct.Struct(">IB")
_STREAM_ID = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


@dataclass(frozen=True, slots=True)
class MessageFrame:
    payload: bytes
    """One JSON message, not yet decoded (:func:`browservm.protocol.messages.decode_message`)."""


@dataclass(frozen=True, slots=True)
class StreamFrame:
    stream_id: int
    data: bytes


Frame = MessageFrame | StreamFrame


def encode_message(message: BaseModel) -> bytes:
    payload = message.model_dump_json(exclude_none=False).encode()
    return _HEADER.pack(len(payload) + 1, FRAME_MESSAGE) + payload


def encode_stream(stream_id: int, data: bytes) -> bytes:
    return _HEADER.pack(len(data) + 1 + _STREAM_ID.size, FRAME_STREAM) + _STREAM_ID.pack(stream_id) + data


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame; ``None`` at a clean end of stream. Raises :class:`ProtocolError` on garbage."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from exc
        return None
    length, kind = _HEADER.unpack(header)
    if length < 1 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
    try:
        payload = await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc
    if kind == FRAME_MESSAGE:
        return MessageFrame(payload)
    if kind == FRAME_STREAM:
        if len(payload) < _STREAM_ID.size:
            raise ProtocolError("stream frame without a stream id")
        (stream_id,) = _STREAM_ID.unpack_from(payload)
        return StreamFrame(stream_id, payload[_STREAM_ID.size :])
    raise ProtocolError(f"unknown frame kind {kind}")
