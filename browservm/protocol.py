"""The channel protocol between the controller and a guest agent.

This module is the only code the controller and the guest share. It must import nothing from
``browservm.controller``, ``browservm.store`` or ``browservm.sandbox`` and nothing beyond pydantic and the
standard library, because the guest image runs it with its own Python.

Transport
---------
The channel is one reliable, ordered byte stream: a unix socket (``process`` backend), a virtio-serial port
(``qemu``), a vsock connection (``firecracker``) or a TLS connection over a pod network (``kubernetes``).
Over it travel *frames*::

    +----------------+--------+------------------------------+
    | length: u32 BE | kind:u8| payload (length - 1 bytes)   |
    +----------------+--------+------------------------------+

* ``kind == FRAME_MESSAGE``: the payload is one JSON message (UTF-8), a :data:`Message`.
* ``kind == FRAME_STREAM``: the payload is ``stream_id: u32 BE`` followed by raw bytes of that stream.
  Streams carry byte pipes that must not be re-encoded as JSON (the RFB connection of the VNC bridge).
  A stream is opened by an :class:`OpenStream` request and closed by :class:`CloseStream` from either side.

Messages
--------
Three shapes, all with ``type`` as discriminator:

* **requests** (controller → agent) carry an ``id``; the agent answers each with exactly one
  :class:`Reply` carrying the same id (``ok`` and a ``result`` object, or an :class:`ErrorBody`).
* **events** (agent → controller) are unsolicited: service states, login progress, signaling from the
  streamer, exec output.
* :class:`Hello` is the first frame the agent sends on every new connection.

Versioning: :data:`PROTOCOL_VERSION` is a single integer. The agent states its version in ``Hello``;
the controller refuses an agent whose version it does not support. Adding an optional field or a new
message type does not change the version; removing or changing the meaning of a field does.
Unknown message types are answered with error code ``unknown_type`` (requests) or ignored (events), so a
newer peer can talk to an older one.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

FRAME_MESSAGE: Final = 0x01
FRAME_STREAM: Final = 0x02
MAX_FRAME = 16 * 1024 * 1024
"""Largest frame either side accepts; a bigger length prefix is a protocol error, not an allocation."""

PROVIDERS = ("claude_code", "codex", "gemini_cli", "demo")
"""Login providers every guest image of this protocol version knows (``browservm/guest/providers/``)."""

_HEADER = struct.Struct(">IB")
_STREAM_ID = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---------------------------------------------------------------------------------------------- shared types


class ScreenConfig(_Model):
    width: int = Field(1280, ge=320, le=3840)
    height: int = Field(720, ge=240, le=2160)
    fps: int = Field(30, ge=1, le=60)


class IceServer(_Model):
    """One entry of RTCConfiguration.iceServers, as the browser and aiortc both take it."""

    urls: list[str]
    username: str | None = None
    credential: str | None = None


class ProxyConfig(_Model):
    """The egress proxy a guest must use for all its traffic (per-user proxies arrive with their issue)."""

    url: str
    """``http://host:port`` or ``socks5://host:port``; credentials travel in ``username``/``password``."""
    username: str | None = None
    password: str | None = None
    bypass: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])


class StreamConfig(_Model):
    codec: Literal["h264", "vp8"] = "h264"
    min_bitrate_kbps: int = Field(300, ge=50)
    max_bitrate_kbps: int = Field(6000, ge=100)
    ice_servers: list[IceServer] = Field(default_factory=list)
    host_addresses: list[str] = Field(default_factory=list)
    """Addresses the streamer gathers ICE host candidates on; empty: every interface (aioice's own
    choice). Loopback-only test beds set e.g. ``["127.0.0.1"]``; when every address is loopback, the
    streamer also ignores non-loopback remote candidates and ICE servers, so no packet leaves loopback."""


class FileBlob(_Model):
    """A file carried over the channel: credential files captured or delivered.

    ``path`` is relative to the CLI user's home directory and never absolute or climbing out of it.
    """

    path: str
    content_b64: str
    mode: int = 0o600
    merge: Literal["replace", "json"] = "replace"
    """``json``: the content is a JSON object merged into the file already there (objects key by key,
    anything else replaced), so a delivered setting keeps the user's other settings."""


class ErrorBody(_Model):
    code: str
    message: str


# ---------------------------------------------------------------------------------------------- hello


class Hello(_Model):
    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    agent_version: str
    sandbox_id: str
    role: Literal["browser", "cli"]
    capabilities: list[str] = Field(default_factory=list)
    """e.g. ``display``, ``webrtc``, ``vnc``, ``login``, ``exec``, ``files``."""


# ---------------------------------------------------------------------------------------------- requests


class RequestBase(_Model):
    id: int


class Configure(RequestBase):
    """Hand a browser sandbox its session. Starts the services and, when ``provider`` is set, the login."""

    type: Literal["configure"] = "configure"
    session_id: str
    provider: str | None = None
    provider_options: dict[str, str] = Field(default_factory=dict)
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    proxy: ProxyConfig | None = None
    start_url: str | None = None
    """Opened in the browser when no provider is set (a plain browsing session, or a test page)."""
    login_timeout_s: float = Field(900.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class Prepare(RequestBase):
    """Start a browser sandbox's services before it has a session (the controller's warm pool): the
    display, the browser on a blank page, the streamer and VNC. A later :class:`Configure` with the same
    ``screen`` and stream codec and bitrates only hands over the session and starts the login."""

    type: Literal["prepare"] = "prepare"
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    env: dict[str, str] = Field(default_factory=dict)


class Status(RequestBase):
    type: Literal["status"] = "status"


class OpenUrl(RequestBase):
    type: Literal["open_url"] = "open_url"
    url: str


class Signal(RequestBase):
    """A WebRTC signaling message for the streamer, from one viewer (``peer_id``).

    ``kind`` ``offer`` and ``answer`` carry ``sdp``; ``candidate`` carries ``candidate`` (the browser's
    RTCIceCandidateInit, ``None`` for end-of-candidates); ``close`` ends that viewer's peer connection.
    The reply to an ``offer`` carries the answer SDP as ``{"sdp": ..., "type": "answer"}``.
    """

    type: Literal["signal"] = "signal"
    peer_id: str
    kind: Literal["offer", "answer", "candidate", "close"]
    sdp: str | None = None
    candidate: dict[str, Any] | None = None
    ice_servers: list[IceServer] | None = None
    """For an ``offer``: the STUN/TURN servers of the session, added by the agent as it relays the
    offer to the streamer (so a streamer started before its session gets the session's credentials).
    ``None``: the streamer's own list."""


class OpenStream(RequestBase):
    """Open a byte stream to a service inside the guest; the reply carries ``{"stream_id": n}``."""

    type: Literal["open_stream"] = "open_stream"
    target: Literal["vnc"]


class CloseStream(_Model):
    """Either side: this stream is done. Not a request (no reply)."""

    type: Literal["close_stream"] = "close_stream"
    stream_id: int


class WriteFiles(RequestBase):
    """Write files into the CLI user's home atomically (temp file + rename), owned by that user."""

    type: Literal["write_files"] = "write_files"
    files: list[FileBlob]


class Exec(RequestBase):
    """Run a command as the CLI user. Output arrives as :class:`ExecOutput` events, then :class:`ExecExit`.

    The reply comes at once with ``{"exec_id": ...}``.
    """

    type: Literal["exec"] = "exec"
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float = Field(300.0, gt=0)
    stdin_b64: str | None = None


class CollectCredentials(RequestBase):
    """Stop the login CLI (never log out) and hand over the credential files; the reply carries them.

    After this the agent deletes its copies: credentials are moved, never copied.
    """

    type: Literal["collect_credentials"] = "collect_credentials"


class Shutdown(RequestBase):
    type: Literal["shutdown"] = "shutdown"


_Requests = (
    Configure
    | Prepare
    | Status
    | OpenUrl
    | Signal
    | OpenStream
    | WriteFiles
    | Exec
    | CollectCredentials
    | Shutdown
)
Request = Annotated[_Requests, Field(discriminator="type")]


class Reply(_Model):
    type: Literal["reply"] = "reply"
    id: int
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: ErrorBody | None = None


# ---------------------------------------------------------------------------------------------- events


ServiceName = Literal["xvfb", "chromium", "streamer", "vnc", "login"]
ServiceStateName = Literal["starting", "ready", "restarting", "failed", "stopped"]


class ServiceState(_Model):
    type: Literal["service_state"] = "service_state"
    service: ServiceName
    state: ServiceStateName
    restarts: int = 0
    detail: str = ""


class LoginState(_Model):
    """Progress of the provider's login inside the guest.

    ``awaiting_user``: the authorization URL is open in the browser (``url``), the user must act.
    ``credentials_ready``: the credential files are complete and parseable; ``account`` is what the
    provider reads from them (email, account id, plan), never a secret.
    ``failed``: the CLI exited or the login timed out; ``detail`` carries the reason and output tail.
    """

    type: Literal["login_state"] = "login_state"
    state: Literal["starting", "awaiting_user", "credentials_ready", "failed", "expired"]
    url: str | None = None
    account: dict[str, str] = Field(default_factory=dict)
    detail: str = ""


class SignalEvent(_Model):
    """Signaling from the streamer to one viewer: a trickled ``candidate`` or a ``closed`` peer."""

    type: Literal["signal_event"] = "signal_event"
    peer_id: str
    kind: Literal["candidate", "closed", "connected"]
    candidate: dict[str, Any] | None = None


class ExecOutput(_Model):
    type: Literal["exec_output"] = "exec_output"
    exec_id: str
    stream: Literal["stdout", "stderr"]
    data_b64: str


class ExecExit(_Model):
    type: Literal["exec_exit"] = "exec_exit"
    exec_id: str
    exit_code: int
    """Negative: killed by that signal number (timeouts are ``-9`` with ``timed_out``)."""
    timed_out: bool = False


_Events = ServiceState | LoginState | SignalEvent | ExecOutput | ExecExit | CloseStream
Event = Annotated[_Events, Field(discriminator="type")]

Message = Annotated[Hello | Reply | _Requests | _Events, Field(discriminator="type")]
"""Anything either side may send: the union of one level (``|`` of unions flattens)."""

_MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


def _type_names(union: object) -> frozenset[str]:
    """The ``type`` values of the models in an ``Annotated[A | B | ..., Field(discriminator="type")]``."""
    (members, *_meta) = get_args(union)
    return frozenset(member.model_fields["type"].default for member in get_args(members))


REQUEST_TYPES = _type_names(Request)


# ---------------------------------------------------------------------------------------------- framing


def encode_message(message: BaseModel) -> bytes:
    payload = message.model_dump_json(exclude_none=False).encode()
    return _HEADER.pack(len(payload) + 1, FRAME_MESSAGE) + payload


def encode_stream(stream_id: int, data: bytes) -> bytes:
    return _HEADER.pack(len(data) + 5, FRAME_STREAM) + _STREAM_ID.pack(stream_id) + data


def decode_message(payload: bytes) -> BaseModel:
    """Parse one message payload. Raises :class:`UnknownMessage` for a well-formed message of a type
    this side does not know (so the caller can answer or ignore it), :class:`ProtocolError` otherwise."""
    try:
        return _MESSAGE.validate_json(payload)
    except ValidationError as exc:
        kind, ident = _peek_type(payload)
        if kind is not None and kind not in _KNOWN_TYPES:
            raise UnknownMessage(kind, ident) from exc
        raise ProtocolError(f"invalid {kind or 'untyped'} message: {exc.errors()[0]['msg']}") from exc


class UnknownMessage(ProtocolError):
    def __init__(self, kind: str, request_id: int | None) -> None:
        super().__init__(f"unknown message type {kind!r}")
        self.kind = kind
        self.request_id = request_id


_KNOWN_TYPES = _type_names(Message)


def _peek_type(payload: bytes) -> tuple[str | None, int | None]:
    import json

    try:
        raw = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    kind = raw.get("type")
    ident = raw.get("id")
    return (kind if isinstance(kind, str) else None), (ident if isinstance(ident, int) else None)


Frame = tuple[Literal[1], BaseModel] | tuple[Literal[2], tuple[int, bytes]]


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
        return (FRAME_MESSAGE, decode_message(payload))
    if kind == FRAME_STREAM:
        if len(payload) < _STREAM_ID.size:
            raise ProtocolError("stream frame without a stream id")
        (stream_id,) = _STREAM_ID.unpack_from(payload)
        return (FRAME_STREAM, (stream_id, payload[_STREAM_ID.size :]))
    raise ProtocolError(f"unknown frame kind {kind}")
