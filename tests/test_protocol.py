"""The channel protocol's framing and messages: what a guest agent of any backend must speak."""

from __future__ import annotations

import asyncio
import struct

import pytest
from pydantic import BaseModel

from browservm import protocol


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


SAMPLES: list[BaseModel] = [
    protocol.Hello(sandbox_id="sb", role="browser", agent_version="1", capabilities=["prepare"]),
    protocol.Prepare(id=1, screen=protocol.ScreenConfig(width=640, height=480, fps=5)),
    protocol.Configure(id=2, session_id="s1", provider="demo", provider_options={"issuer": "http://x"}),
    protocol.Signal(
        id=3,
        peer_id="p",
        kind="offer",
        sdp="v=0",
        ice_servers=[protocol.IceServer(urls=["turn:127.0.0.1:3478"], username="1:s", credential="c")],
    ),
    protocol.WriteFiles(id=4, files=[protocol.FileBlob(path=".a.json", content_b64="e30=", merge="json")]),
    protocol.Reply(id=4, ok=False, error=protocol.ErrorBody(code="bad_path", message="no")),
    protocol.ServiceState(service="chromium", state="restarting", restarts=2, detail="exited"),
    protocol.ExecExit(exec_id="e1", exit_code=-9, timed_out=True),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
async def test_every_kind_of_message_survives_a_frame(message: BaseModel) -> None:
    frame = await protocol.read_frame(feed(protocol.encode_message(message)))
    assert frame == (protocol.FRAME_MESSAGE, message)


async def test_stream_frames_carry_their_id_and_bytes() -> None:
    reader = feed(protocol.encode_stream(7, b"RFB 003.008\n") + protocol.encode_stream(8, b""))
    assert await protocol.read_frame(reader) == (protocol.FRAME_STREAM, (7, b"RFB 003.008\n"))
    assert await protocol.read_frame(reader) == (protocol.FRAME_STREAM, (8, b""))
    assert await protocol.read_frame(reader) is None, "a clean end of stream"


def test_every_request_and_event_can_be_decoded() -> None:
    """Message is the union a reader decodes: a request or event missing from it would be 'unknown'."""
    known = protocol._type_names(protocol.Message)
    assert known >= protocol.REQUEST_TYPES
    assert protocol._type_names(protocol.Event) <= known
    assert {"hello", "reply"} <= known


def test_an_unknown_type_is_told_apart_from_garbage() -> None:
    with pytest.raises(protocol.UnknownMessage) as unknown:
        protocol.decode_message(b'{"type": "teleport", "id": 9}')
    assert (unknown.value.kind, unknown.value.request_id) == ("teleport", 9)
    with pytest.raises(protocol.ProtocolError, match="invalid configure"):
        protocol.decode_message(b'{"type": "configure", "id": 1}')  # no session_id
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_message(b"not json")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">IB", 0, 1), "outside"),
        (struct.pack(">IB", protocol.MAX_FRAME + 1, 1), "outside"),
        (struct.pack(">IB", 5, 1) + b"{}", "inside a frame"),
        (struct.pack(">I", 5), "inside a frame header"),
        (struct.pack(">IB", 3, 2) + b"\x00\x00", "without a stream id"),
        (struct.pack(">IB", 1, 9), "unknown frame kind"),
    ],
)
async def test_malformed_frames_are_protocol_errors(data: bytes, error: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=error):
        await protocol.read_frame(feed(data))


async def test_a_streams_first_bytes_right_behind_its_reply_are_not_lost() -> None:
    """An RFB server speaks first: the agent's first stream frame can arrive in the same read as the reply
    that names the stream. The channel must already know the stream by then."""
    import socket

    from browservm.sandbox.channel import Channel

    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    agent_reader, agent_writer = await asyncio.open_connection(sock=theirs)
    hello = protocol.Hello(sandbox_id="sb", role="browser", agent_version="1", capabilities=[])
    agent_writer.write(protocol.encode_message(hello))
    channel = await Channel.handshake("sb", reader, writer)
    try:
        opening = asyncio.create_task(channel.open_stream("vnc"))
        frame = await protocol.read_frame(agent_reader)
        assert frame is not None and isinstance(frame[1], protocol.OpenStream)
        reply = protocol.Reply(id=frame[1].id, ok=True, result={"stream_id": 7})
        agent_writer.write(protocol.encode_message(reply) + protocol.encode_stream(7, b"RFB 003.008\n"))
        stream = await asyncio.wait_for(opening, 5)
        assert await asyncio.wait_for(stream.read(), 5) == b"RFB 003.008\n"
    finally:
        await channel.close()
        agent_writer.close()
