"""The channel protocol's framing, messages and peer: what a guest agent of any backend must speak."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import AsyncIterator
from typing import get_args

import pytest
from pydantic import BaseModel

from browservm import protocol
from browservm.sandbox.channel import SUBSCRIBER_QUEUE, Channel, IncompatibleAgent, RemoteCommand

MiB = 1024 * 1024


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def read_message(reader: asyncio.StreamReader) -> BaseModel:
    frame = await protocol.read_frame(reader)
    assert isinstance(frame, protocol.MessageFrame)
    return protocol.decode_message(frame.payload)


async def connected_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    ours, theirs = socket.socketpair()
    return await asyncio.open_connection(sock=ours), await asyncio.open_connection(sock=theirs)


SAMPLES: list[BaseModel] = [
    protocol.Hello(sandbox_id="sb", role="browser", agent_version="1", capabilities=["prepare"]),
    protocol.Prepare(id=1, screen=protocol.ScreenConfig(width=640, height=480, fps=5)),
    protocol.Configure(
        id=2,
        session_id="s1",
        provider="demo",
        provider_options={"issuer": "http://x"},
        debug=protocol.Debug(devtools_port=True),
    ),
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
    assert await read_message(feed(protocol.encode_message(message))) == message


async def test_stream_frames_carry_their_id_and_bytes() -> None:
    reader = feed(protocol.encode_stream(7, b"RFB 003.008\n") + protocol.encode_stream(8, b""))
    assert await protocol.read_frame(reader) == protocol.StreamFrame(7, b"RFB 003.008\n")
    assert await protocol.read_frame(reader) == protocol.StreamFrame(8, b"")
    assert await protocol.read_frame(reader) is None, "a clean end of stream"


def test_every_request_and_event_can_be_decoded_and_names_its_reply() -> None:
    """Message is the union a reader decodes: a request or event missing from it would be 'unknown'."""
    assert protocol.REQUEST_TYPES | protocol.EVENT_TYPES | {"hello", "reply"} <= protocol.KNOWN_TYPES
    (members, *_) = get_args(protocol.AnyRequest)
    for request in get_args(members):
        assert issubclass(request.reply_model, BaseModel), request


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


# ---------------------------------------------------------------------------------------------- the peer


@pytest.fixture
async def peers() -> AsyncIterator[tuple[protocol.Peer, protocol.Peer]]:
    """A requester and a server whose handlers show each way a request can end."""
    (a_reader, a_writer), (b_reader, b_writer) = await connected_pair()
    release = asyncio.Event()

    async def status(request: protocol.Status) -> protocol.AgentStatus:
        return protocol.AgentStatus(
            sandbox_id="sb", role="cli", agent_pid=1, configured=False, prepared=False
        )

    async def open_url(request: protocol.OpenUrl) -> protocol.UrlOpened:
        if request.url == "refuse":
            raise protocol.RequestError("refused", "not that one")
        if request.url == "wait":
            await release.wait()
        return protocol.UrlOpened(url=request.url)

    async def wrong(request: protocol.Shutdown) -> protocol.UrlOpened:
        return protocol.UrlOpened(url="a bug: shutdown answers Ack")

    server = protocol.Peer(
        b_reader,
        b_writer,
        name="server",
        handlers={protocol.Status: status, protocol.OpenUrl: open_url, protocol.Shutdown: wrong},
        max_serving=2,
    )
    client = protocol.Peer(a_reader, a_writer, name="client")
    yield client, server
    release.set()
    await client.close()
    await server.close()


async def test_a_request_gets_its_reply_model(peers: tuple[protocol.Peer, protocol.Peer]) -> None:
    client, _ = peers
    status = await client.request(protocol.Status())
    assert isinstance(status, protocol.AgentStatus)
    assert status.sandbox_id == "sb"
    opened = await client.request(protocol.OpenUrl(url="https://example.test/"))
    assert opened.url == "https://example.test/"


async def test_refusals_unknown_requests_and_handler_bugs_are_error_replies(
    peers: tuple[protocol.Peer, protocol.Peer],
) -> None:
    client, server = peers
    with pytest.raises(protocol.RequestError) as refused:
        await client.request(protocol.OpenUrl(url="refuse"))
    assert (refused.value.code, refused.value.message) == ("refused", "not that one")
    with pytest.raises(protocol.RequestError) as unsupported:
        await client.request(protocol.Exec(argv=["true"]))
    assert unsupported.value.code == "unsupported"
    with pytest.raises(protocol.RequestError) as bug:
        await client.request(protocol.Shutdown())
    assert bug.value.code == "internal"
    assert "not a Ack" in bug.value.message
    assert not server.closed.is_set(), "a failed request never ends the connection"


async def test_a_reply_that_is_not_the_requests_model_is_a_protocol_error() -> None:
    (a_reader, a_writer), (b_reader, b_writer) = await connected_pair()
    client = protocol.Peer(a_reader, a_writer, name="client")
    try:
        asking = asyncio.create_task(client.request(protocol.Exec(argv=["x"])))
        request = await read_message(b_reader)
        assert isinstance(request, protocol.Exec)
        b_writer.write(protocol.encode_message(protocol.Reply(id=request.id, ok=True, result={"pid": 3})))
        with pytest.raises(protocol.ProtocolError, match="not a ExecStarted"):
            await asyncio.wait_for(asking, 5)
    finally:
        await client.close()
        b_writer.close()


async def test_past_its_limit_a_peer_answers_busy_and_keeps_serving(
    peers: tuple[protocol.Peer, protocol.Peer],
) -> None:
    client, _ = peers
    waiting = [asyncio.create_task(client.request(protocol.OpenUrl(url="wait"))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(protocol.RequestError) as busy:
        # The two above hold both slots once the server has read them; this one comes behind them.
        await client.request(protocol.OpenUrl(url="third"))
    assert busy.value.code == "busy"
    for task in waiting:
        task.cancel()


async def test_an_unknown_or_malformed_request_is_answered_by_id() -> None:
    (a_reader, a_writer), (b_reader, b_writer) = await connected_pair()
    server = protocol.Peer(b_reader, b_writer, name="server")
    try:
        for payload in (b'{"type": "teleport", "id": 9001}', b'{"type": "open_url", "id": 9002}'):
            a_writer.write(struct.pack(">IB", len(payload) + 1, protocol.FRAME_MESSAGE) + payload)
        unknown, malformed = await read_message(a_reader), await read_message(a_reader)
        assert isinstance(unknown, protocol.Reply) and unknown.error is not None
        assert (unknown.id, unknown.error.code) == (9001, "unknown_type")
        assert isinstance(malformed, protocol.Reply) and malformed.error is not None
        assert (malformed.id, malformed.error.code) == (9002, "bad_request")
    finally:
        await server.close()
        a_writer.close()


# ---------------------------------------------------------------------------------------------- the channel


async def test_a_streams_first_bytes_right_behind_its_reply_are_not_lost() -> None:
    """An RFB server speaks first: the agent's first stream frame can arrive in the same read as the reply
    that names the stream. The channel must already know the stream by then."""
    (reader, writer), (agent_reader, agent_writer) = await connected_pair()
    hello = protocol.Hello(
        sandbox_id="sb", role="browser", agent_version="1", capabilities=sorted(protocol.CAPABILITIES)
    )
    agent_writer.write(protocol.encode_message(hello))
    channel = await Channel.handshake("sb", reader, writer)
    try:
        opening = asyncio.create_task(channel.open_stream("vnc"))
        request = await read_message(agent_reader)
        assert isinstance(request, protocol.OpenStream)
        reply = protocol.Reply(id=request.id, ok=True, result={"stream_id": 7})
        agent_writer.write(protocol.encode_message(reply) + protocol.encode_stream(7, b"RFB 003.008\n"))
        stream = await asyncio.wait_for(opening, 5)
        assert await asyncio.wait_for(stream.read(), 5) == b"RFB 003.008\n"
    finally:
        await channel.close()
        agent_writer.close()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (
            protocol.Hello(
                sandbox_id="sb", role="cli", agent_version="0.0.9", protocol=1, capabilities=["exec"]
            ),
            "speaks protocol 1",
        ),
        (
            protocol.Hello(sandbox_id="sb", role="cli", agent_version="0.2", capabilities=["exec"]),
            "lacks files",
        ),
        (
            protocol.Hello(
                sandbox_id="sb", role="browser", agent_version="0.2", capabilities=["display", "vnc"]
            ),
            "lacks login, prepare",
        ),
    ],
)
async def test_a_controller_refuses_an_agent_it_cannot_speak_to(hello: protocol.Hello, reason: str) -> None:
    (reader, writer), (_agent_reader, agent_writer) = await connected_pair()
    agent_writer.write(protocol.encode_message(hello))
    try:
        with pytest.raises(IncompatibleAgent, match=reason) as refused:
            await Channel.handshake("sb", reader, writer)
        assert "rebuild the guest image" in str(refused.value)
    finally:
        writer.close()
        agent_writer.close()


async def fake_agent(
    role: protocol.Role = "cli",
) -> tuple[Channel, asyncio.StreamReader, asyncio.StreamWriter]:
    """A channel to an agent played by the test, byte by byte."""
    (reader, writer), (agent_reader, agent_writer) = await connected_pair()
    hello = protocol.Hello(
        sandbox_id="sb",
        role=role,
        agent_version="1",
        capabilities=sorted(protocol.REQUIRED_CAPABILITIES[role]),
    )
    agent_writer.write(protocol.encode_message(hello))
    return await Channel.handshake("sb", reader, writer), agent_reader, agent_writer


async def test_a_subscriber_that_stops_reading_is_cut_off_and_the_others_keep_their_events() -> None:
    channel, _agent_reader, agent_writer = await fake_agent()
    try:
        async with channel.subscribe() as stuck, channel.subscribe() as reading:
            state = protocol.ServiceState(service="vnc", state="ready")
            count = SUBSCRIBER_QUEUE + 10
            for _ in range(count):
                agent_writer.write(protocol.encode_message(state))
            async with asyncio.timeout(10):
                for _ in range(count):
                    assert await reading.get() == state
            assert stuck.qsize() == SUBSCRIBER_QUEUE + 1
            events = [stuck.get_nowait() for _ in range(SUBSCRIBER_QUEUE + 1)]
            assert events[-1] is None, "cut off: told as at a close"
            assert not channel.closed.is_set()
    finally:
        await channel.close()
        agent_writer.close()


async def started(
    channel: Channel,
    agent_reader: asyncio.StreamReader,
    agent_writer: asyncio.StreamWriter,
    window_bytes: int,
) -> RemoteCommand:
    """``yes`` started through the channel, the fake agent answering that it runs as ``x1``."""
    starting = asyncio.create_task(channel.exec(protocol.Exec(argv=["yes"], window_bytes=window_bytes)))
    request = await read_message(agent_reader)
    assert isinstance(request, protocol.Exec) and request.window_bytes == window_bytes
    agent_writer.write(
        protocol.encode_message(protocol.Reply(id=request.id, ok=True, result={"exec_id": "x1"}))
    )
    return await asyncio.wait_for(starting, 5)


async def test_an_agent_that_overruns_its_exec_window_ends_that_command_only() -> None:
    channel, agent_reader, agent_writer = await fake_agent()
    try:
        command = await started(channel, agent_reader, agent_writer, window_bytes=4096)
        chunk = base64.b64encode(b"y\n" * 1500).decode()  # 3000 bytes: the second one overruns 4096
        for _ in range(2):
            agent_writer.write(
                protocol.encode_message(protocol.ExecOutput(exec_id="x1", stream="stdout", data_b64=chunk))
            )

        async def drain() -> None:
            async for _event in command:
                pass

        with pytest.raises(protocol.ProtocolError, match="window of 4096"):
            await asyncio.wait_for(drain(), 5)
        told = await read_message(agent_reader)
        assert told == protocol.ExecClose(exec_id="x1")
        assert not channel.closed.is_set()
    finally:
        await channel.close()
        agent_writer.close()


async def test_taking_exec_output_gives_the_agent_credit_back() -> None:
    channel, agent_reader, agent_writer = await fake_agent()
    try:
        command = await started(channel, agent_reader, agent_writer, window_bytes=8192)
        chunk = base64.b64encode(b"y" * 4096).decode()
        agent_writer.write(
            protocol.encode_message(protocol.ExecOutput(exec_id="x1", stream="stdout", data_b64=chunk))
            + protocol.encode_message(protocol.ExecExit(exec_id="x1", exit_code=0))
        )
        events = [event async for event in command]
        assert [type(event) for event in events] == [protocol.ExecOutput, protocol.ExecExit]
        assert await read_message(agent_reader) == protocol.ExecCredit(exec_id="x1", bytes=4096)
    finally:
        await channel.close()
        agent_writer.close()


async def test_a_peer_whose_other_side_stops_reading_is_disconnected_not_grown() -> None:
    (a_reader, a_writer), (_b_reader, b_writer) = await connected_pair()
    peer = protocol.Peer(a_reader, a_writer, name="stuck controller", max_buffered=MiB)
    event = protocol.SignalEvent(peer_id="p", kind="candidate", candidate={"candidate": "x" * 65536})
    sent = 0
    try:
        async with asyncio.timeout(10):
            while not peer.closed.is_set():
                peer.send(event)
                sent += 65536
                await asyncio.sleep(0)  # the writer hands what it can to the kernel
        assert "stopped reading" in peer.why_closed
        assert sent < 32 * MiB, "kernel buffers plus the cap, not everything the sender had"
        assert not peer.send(event), "a closed peer drops what it is given"
    finally:
        await peer.close()
        b_writer.close()
