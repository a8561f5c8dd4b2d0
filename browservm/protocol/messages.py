"""The messages of the channel protocol, in one place: what a controller, an agent and a streamer say.

Three shapes, all with ``type`` as discriminator:

* **requests** carry an ``id`` (set by the sending :class:`~browservm.protocol.peer.Peer`) and each names
  its reply model: ``class Status(Request[AgentStatus])``. The other side answers each with exactly one
  :class:`Reply` carrying the same id: ``ok`` and a ``result`` object that the requester validates against
  that model, or an :class:`ErrorBody`.
* **events** are unsolicited and get no reply: service states, login progress, signaling from the streamer
  and exec output (agent to controller); exec flow control (controller to agent); ``close_stream`` (either).
* :class:`Hello` is the first frame an agent sends on every new connection.

Versioning: :data:`PROTOCOL_VERSION` is a single integer. The agent states its version in ``Hello``; the
controller refuses an agent whose version it does not support, and one that lacks a capability its role
needs (:data:`REQUIRED_CAPABILITIES`). Adding an optional field or a new message type does not change the
version; removing a field, making one required or changing its meaning does. The checked-in JSON Schema
(:mod:`browservm.protocol.schema`) holds every version to that. Unknown message types are answered with
error code ``unknown_type`` (requests) or ignored (events), so a newer peer can talk to an older one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Final, Generic, Literal, TypeVar, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from browservm.protocol.framing import ProtocolError

PROTOCOL_VERSION: Final = 2
SUPPORTED_VERSIONS: Final = frozenset({2})

PROVIDERS = ("claude_code", "codex", "gemini_cli", "demo")
"""Login providers every guest image of this protocol version knows (``browservm/guest/providers/``)."""

Role = Literal["browser", "cli"]

CAPABILITIES: Final = frozenset({"display", "webrtc", "vnc", "login", "prepare", "exec", "files"})
"""What an agent may offer in ``Hello.capabilities``. An agent offers only what its image really has
(``webrtc`` needs the streamer module, ``login`` the login module)."""
REQUIRED_CAPABILITIES: Final[dict[Role, frozenset[str]]] = {
    "browser": frozenset({"display", "vnc", "login", "prepare"}),
    "cli": frozenset({"exec", "files"}),
}
"""What a controller of this version needs of an agent in each role. ``webrtc`` is not among them: without
it a viewer falls back to VNC."""

EXEC_WINDOW_BYTES: Final = 256 * 1024
"""Default output of one command the agent may send before the controller acknowledges it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---------------------------------------------------------------------------------------------- shared types


class ScreenConfig(_Model):
    width: int = Field(1280, ge=320, le=3840)
    height: int = Field(720, ge=240, le=2160)
    fps: int = Field(30, ge=1, le=60)
    max_width: int | None = Field(None, ge=320, le=3840)
    """The widest the screen may grow to follow a viewer's size; ``None``: it stays ``width`` wide."""
    max_height: int | None = Field(None, ge=240, le=2160)

    @property
    def largest(self) -> tuple[int, int]:
        """The size the display is created at (it can shrink from there, never grow)."""
        return max(self.width, self.max_width or 0), max(self.height, self.max_height or 0)


class IceServer(_Model):
    """One entry of RTCConfiguration.iceServers, as the browser and aiortc both take it."""

    urls: list[str]
    username: str | None = None
    credential: str | None = None


class ProxyConfig(_Model):
    """The session's egress proxy (docs/egress.md): the browser opens the session's pages in a context
    that goes through it, the login CLI gets it in ``HTTPS_PROXY``/``HTTP_PROXY``, the loopback bypasses it."""

    url: str
    """``http://host:port``, ``https://host:port`` or ``socks5://host:port``; never with credentials,
    which travel in ``username``/``password``."""
    username: str | None = None
    password: str | None = Field(None, repr=False)
    """Kept out of ``repr`` (and so out of any log line that prints the request)."""
    bypass: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])


class MediaMapping(_Model):
    """A public UDP port the host maps 1:1 to this guest (``guest_address:guest_port``): the streamer
    binds its ICE socket there and advertises ``public_ip:public_port`` as a host candidate, so a viewer reaches it without TURN (which stays the fallback)."""

    public_ip: str
    public_port: int = Field(ge=1, le=65535)
    guest_address: str
    guest_port: int = Field(ge=1, le=65535)


class StreamConfig(_Model):
    codec: Literal["h264", "vp8"] = "h264"
    min_bitrate_kbps: int = Field(300, ge=50)
    max_bitrate_kbps: int = Field(6000, ge=100)
    ice_servers: list[IceServer] = Field(default_factory=list)
    host_addresses: list[str] = Field(default_factory=list)
    """Addresses the streamer gathers ICE host candidates on; empty: every interface (aioice's own
    choice). Loopback-only test beds set e.g. ``["127.0.0.1"]``; when every address is loopback, the
    streamer also ignores non-loopback remote candidates and ICE servers, so no packet leaves loopback."""
    media: MediaMapping | None = None
    """The session's sandbox's public UDP mapping, if the host has one (per sandbox, like the TURN
    credentials: a warm sandbox is prepared without it)."""


class Debug(_Model):
    """Switches for debugging and tests; all off in production."""

    devtools_port: bool = False
    """Open Chromium's DevTools on a loopback port as well as the agent's pipe (never on a shared host:
    anyone on that loopback could drive the user's browser)."""


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


ServiceName = Literal["xvfb", "chromium", "streamer", "vnc", "login"]
ServiceStateName = Literal["starting", "ready", "restarting", "failed", "stopped"]


# ---------------------------------------------------------------------------------------------- hello


class Hello(_Model):
    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    agent_version: str
    sandbox_id: str
    role: Role
    capabilities: list[str] = Field(default_factory=list)
    """Of :data:`CAPABILITIES`; a name this controller does not know is a newer agent's, and ignored."""
    idle_timeout_s: float | None = None
    """The agent ends itself when no controller has spoken to it for this long (``None``: never). A
    controller's channel speaks (:class:`Ping`) well within it."""


# ---------------------------------------------------------------------------------------------- replies


class Ack(_Model):
    """The request was carried out; there is nothing more to say."""


class ServicesStarted(_Model):
    services: list[str]
    """The services the agent supervises now."""


class ServiceReport(_Model):
    state: ServiceStateName
    restarts: int = 0
    pid: int | None = None
    """As the agent sees it: inside the sandbox's own PID namespace where it has one."""
    detail: str = ""
    log: str = ""
    """The service's log file inside the guest."""


class LoginState(_Model):
    """Progress of the provider's login inside the guest (an event, and part of :class:`AgentStatus`).

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


class AgentStatus(_Model):
    sandbox_id: str
    role: Role
    agent_pid: int
    configured: bool
    prepared: bool
    services: dict[str, ServiceReport] = Field(default_factory=dict)
    login: LoginState | None = None
    display: str | None = None
    devtools_port: int | None = None
    """Set only when :attr:`Debug.devtools_port` asked for one."""
    vnc_port: int | None = None

    @property
    def pids(self) -> dict[str, int | None]:
        return {name: report.pid for name, report in self.services.items()}


class UrlOpened(_Model):
    url: str


class Answer(_Model):
    """The streamer's reply to a :class:`Signal`: for an ``offer``, the answer SDP (complete with its
    candidates); for the other kinds nothing."""

    sdp: str | None = None


class StreamOpened(_Model):
    stream_id: int


class FilesWritten(_Model):
    written: list[str]
    """The paths written, relative to the home directory."""


class FilesRead(_Model):
    files: list[FileBlob]
    """The files that exist, as they are now (mode included); a path with no file is left out."""


class ExecStarted(_Model):
    exec_id: str


class Credentials(_Model):
    files: list[FileBlob]


class StreamerStatus(_Model):
    state: ServiceStateName
    capture: str | None = None
    """``pixelflux`` or ``x11grab`` once capturing."""
    codec: str
    viewers: int
    frames: int
    """Encoded since the streamer started."""
    bytes: int
    bitrate_kbps: int | None = None
    width: int | None = None
    """The size captured now (the screen's, which follows the viewer within its bounds)."""
    height: int | None = None


# ---------------------------------------------------------------------------------------------- requests

ResultT = TypeVar("ResultT", bound=BaseModel)


class Request(_Model, Generic[ResultT]):
    """A message that gets exactly one :class:`Reply`; subclasses name their reply model as the type
    argument, and the requester gets that model back."""

    id: int = 0
    """Chosen by the sending peer (any value given here is replaced); unique among its open requests."""

    reply_model: ClassVar[type[BaseModel]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        metadata = cls.__pydantic_generic_metadata__
        if metadata["origin"] is Request and metadata["args"]:
            (cls.reply_model,) = metadata["args"]  # Request[Model]: what every subclass of it answers

    def parse_reply(self, result: dict[str, Any]) -> ResultT:
        """The reply's ``result`` as this request's reply model. Raises :class:`ProtocolError`."""
        try:
            return cast(ResultT, self.reply_model.model_validate(result))
        except ValidationError as exc:
            raise ProtocolError(
                f"the reply to {type(self).model_fields['type'].default!r} is not a {self.reply_model.__name__}: "
                f"{exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))}"
            ) from exc


class Configure(Request[ServicesStarted]):
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
    expires_in_s: float | None = Field(None, gt=0)
    """The agent ends itself (and everything in the sandbox) this long after it received this request:
    the session's expiry, plus what time the controller wants for its own clean-up. Relative, so that a
    guest clock that is off does not matter. ``None``: no end of its own."""
    debug: Debug = Field(default_factory=Debug)


class Prepare(Request[ServicesStarted]):
    """Start a browser sandbox's services before it has a session (the controller's warm pool): the
    display, the browser on a blank page, the streamer and VNC. A later :class:`Configure` with the same
    ``screen``, stream codec and bitrates and ``debug`` only hands over the session and starts the login."""

    type: Literal["prepare"] = "prepare"
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    debug: Debug = Field(default_factory=Debug)


class Status(Request[AgentStatus]):
    type: Literal["status"] = "status"


class Ping(Request[Ack]):
    """The controller is still there (see :attr:`Hello.idle_timeout_s`)."""

    type: Literal["ping"] = "ping"


class OpenUrl(Request[UrlOpened]):
    type: Literal["open_url"] = "open_url"
    url: str


class Signal(Request[Answer]):
    """A WebRTC signaling message for the streamer, from one viewer (``peer_id``).

    ``kind`` ``offer`` and ``answer`` carry ``sdp``; ``candidate`` carries ``candidate`` (the browser's
    RTCIceCandidateInit, ``None`` for end-of-candidates); ``close`` ends that viewer's peer connection.
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
    media: MediaMapping | None = None
    """For an ``offer``: the sandbox's public UDP mapping, added by the agent like ``ice_servers``."""


class OpenStream(Request[StreamOpened]):
    """Open a byte stream to a service inside the guest. The stream's first bytes may follow the reply
    at once (an RFB server speaks first)."""

    type: Literal["open_stream"] = "open_stream"
    target: Literal["vnc"]


class WriteFiles(Request[FilesWritten]):
    """Write files into the CLI user's home atomically (temp file + rename), owned by that user."""

    type: Literal["write_files"] = "write_files"
    files: list[FileBlob]


class ReadFiles(Request[FilesRead]):
    """Read files of the CLI user's home (the controller reads back credential files the user's tools
    have refreshed, to keep the vault in step). Paths as for :class:`WriteFiles`."""

    type: Literal["read_files"] = "read_files"
    paths: list[str] = Field(max_length=64)


class Exec(Request[ExecStarted]):
    """Run a command as the CLI user. Output arrives as :class:`ExecOutput` events, then :class:`ExecExit`.

    Flow control: the agent sends at most ``window_bytes`` of output (stdout and stderr together, before
    base64) beyond what the controller has acknowledged with :class:`ExecCredit`. Past that it stops
    reading the command's pipes, so the command blocks on its writes as it would in a shell pipeline.
    """

    type: Literal["exec"] = "exec"
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float = Field(300.0, gt=0)
    stdin_b64: str | None = None
    window_bytes: int = Field(EXEC_WINDOW_BYTES, ge=4096, le=16 * 1024 * 1024)


class CollectCredentials(Request[Credentials]):
    """Stop the login CLI (never log out) and hand over the credential files; the reply carries them.

    After this the agent deletes its copies: credentials are moved, never copied.
    """

    type: Literal["collect_credentials"] = "collect_credentials"


class StreamStatus(Request[StreamerStatus]):
    """What the streamer is doing (asked of the streamer by its agent, and by tests and benches)."""

    type: Literal["stream_status"] = "stream_status"


class Shutdown(Request[Ack]):
    type: Literal["shutdown"] = "shutdown"


_Requests = (
    Configure
    | Prepare
    | Status
    | Ping
    | OpenUrl
    | Signal
    | OpenStream
    | WriteFiles
    | ReadFiles
    | Exec
    | CollectCredentials
    | StreamStatus
    | Shutdown
)
AnyRequest = Annotated[_Requests, Field(discriminator="type")]


class Reply(_Model):
    type: Literal["reply"] = "reply"
    id: int
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    """The request's reply model, as JSON."""
    error: ErrorBody | None = None


# ---------------------------------------------------------------------------------------------- events


class ServiceState(_Model):
    type: Literal["service_state"] = "service_state"
    service: ServiceName
    state: ServiceStateName
    restarts: int = 0
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

    @property
    def size(self) -> int:
        """Bytes of output this carries (what flow control counts), without decoding it."""
        return len(self.data_b64) * 3 // 4 - self.data_b64[-2:].count("=")


class ExecExit(_Model):
    type: Literal["exec_exit"] = "exec_exit"
    exec_id: str
    exit_code: int
    """Negative: killed by that signal number (timeouts are ``-9`` with ``timed_out``)."""
    timed_out: bool = False


class ExecCredit(_Model):
    """Controller to agent: this much more of the command's output may be sent (its consumer took it)."""

    type: Literal["exec_credit"] = "exec_credit"
    exec_id: str
    bytes: int = Field(ge=1)


class ExecClose(_Model):
    """Controller to agent: nobody will read this command's output any more. The agent closes the
    command's output pipes (its next write fails with ``EPIPE``, as when a pipeline's reader exits)."""

    type: Literal["exec_close"] = "exec_close"
    exec_id: str


class CloseStream(_Model):
    """Either side: this stream is done."""

    type: Literal["close_stream"] = "close_stream"
    stream_id: int


_Events = (
    ServiceState | LoginState | SignalEvent | ExecOutput | ExecExit | ExecCredit | ExecClose | CloseStream
)
Event = Annotated[_Events, Field(discriminator="type")]

Message = Annotated[Hello | Reply | _Requests | _Events, Field(discriminator="type")]
"""Anything either side may send: the union of one level (``|`` of unions flattens)."""

_MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


def type_names(union: object) -> frozenset[str]:
    """The ``type`` values of the models in an ``Annotated[A | B | ..., Field(discriminator="type")]``."""
    (members, *_meta) = get_args(union)
    return frozenset(member.model_fields["type"].default for member in get_args(members))


REQUEST_TYPES: Final = type_names(AnyRequest)
EVENT_TYPES: Final = type_names(Event)
KNOWN_TYPES: Final = type_names(Message)


class UnknownMessage(ProtocolError):
    """A well-formed message of a type this side does not know (a newer peer's)."""

    def __init__(self, kind: str, request_id: int | None) -> None:
        super().__init__(f"unknown message type {kind!r}")
        self.kind = kind
        self.request_id = request_id


def decode_message(payload: bytes) -> BaseModel:
    """Parse one message payload. Raises :class:`UnknownMessage` for a well-formed message of a type
    this side does not know (so the caller can answer or ignore it), :class:`ProtocolError` otherwise."""
    try:
        return _MESSAGE.validate_json(payload)
    except ValidationError as exc:
        kind, ident = peek(payload)
        if kind is not None and kind not in KNOWN_TYPES:
            raise UnknownMessage(kind, ident) from exc
        raise ProtocolError(f"invalid {kind or 'untyped'} message: {exc.errors()[0]['msg']}") from exc


def peek(payload: bytes) -> tuple[str | None, int | None]:
    """The ``type`` and ``id`` of a message that may not validate (``None`` for what is missing)."""
    try:
        raw = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(raw, dict):
        return None, None
    kind = raw.get("type")
    ident = raw.get("id")
    return (kind if isinstance(kind, str) else None), (ident if isinstance(ident, int) else None)
