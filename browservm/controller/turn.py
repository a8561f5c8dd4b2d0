"""TURN for viewers: short-lived TURN REST credentials, and a local coturn for development and tests.

The credential scheme is coturn's ``use-auth-secret`` ("TURN REST API", draft-uberti-behave-turn-rest):
the username is ``"{expiry}:{session_id}"`` and the password is ``base64(HMAC-SHA1(secret, username))``.
coturn recomputes the password from the shared secret and refuses the username once ``expiry`` (a Unix
time) has passed, so nothing is stored per session and a leaked credential dies with its session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from browservm import protocol
from browservm.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TurnCredential:
    username: str
    credential: str
    expires_at: int
    """Unix time after which coturn refuses the username."""


def turn_credential(
    secret: str,
    session_id: str,
    *,
    ttl_s: float,
    not_after: float | None = None,
    now: float | None = None,
) -> TurnCredential:
    """A TURN REST credential for one session, valid ``ttl_s`` but never past ``not_after``.

    ``not_after`` is the session's own expiry: a viewer has no use for TURN once its session is over.
    """
    if not secret:
        raise ValueError("TURN secret is empty: set BROWSERVM_TURN_SECRET to coturn's static-auth-secret")
    issued = time.time() if now is None else now
    expiry = issued + ttl_s
    if not_after is not None:
        expiry = min(expiry, not_after)
    expires_at = int(expiry)
    username = f"{expires_at}:{session_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), expires_at)


def ice_servers(
    settings: Settings,
    session_id: str,
    *,
    session_expires_at: float | None = None,
    now: float | None = None,
    turn_urls: Sequence[str] | None = None,
) -> list[protocol.IceServer]:
    """The RTCConfiguration.iceServers a viewer of ``session_id`` gets: STUN as configured, TURN with a
    credential of its own. Empty when neither is configured (loopback and LAN setups need neither).
    ``turn_urls``: where the TURN server is reached from elsewhere (a guest's, see :func:`guest_turn_urls`)."""
    urls = list(settings.turn_urls if turn_urls is None else turn_urls)
    servers: list[protocol.IceServer] = []
    if settings.stun_urls:
        servers.append(protocol.IceServer(urls=list(settings.stun_urls)))
    if urls:
        cred = turn_credential(
            settings.turn_secret,
            session_id,
            ttl_s=settings.turn_ttl_s,
            not_after=session_expires_at,
            now=now,
        )
        servers.append(protocol.IceServer(urls=urls, username=cred.username, credential=cred.credential))
    return servers


def coturn_port(settings: Settings) -> int:
    """The port of the local coturn ``run_coturn`` starts (that of the first ``turn:`` URL, else 3478)."""
    return Coturn.from_settings(settings).port or 3478


def guest_turn_urls(settings: Settings, gateway: str | None) -> list[str]:
    """Where guests' streamers reach TURN: ``guest_turn_urls`` when set; the local coturn on the sandbox
    network's gateway when ``serve`` runs one; else the viewers' URLs (a TURN server on the internet)."""
    if settings.guest_turn_urls:
        return list(settings.guest_turn_urls)
    if settings.run_coturn and gateway is not None:
        port = coturn_port(settings)
        return [f"turn:{gateway}:{port}?transport=udp", f"turn:{gateway}:{port}?transport=tcp"]
    return list(settings.turn_urls)


# ---------------------------------------------------------------------------------------------- coturn


class CoturnError(Exception):
    """coturn did not start or did not answer; the message carries the tail of its log."""


_STUN_MAGIC = 0x2112A442
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` right now (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise CoturnError(f"no port free for both UDP and TCP on {host}")


def stun_binding(host: str, port: int, *, timeout_s: float = 0.2) -> bool:
    """Send one STUN Binding request over UDP; ``True`` if a Binding success answer comes back."""
    transaction = secrets.token_bytes(12)
    request = struct.pack(">HHI", _BINDING_REQUEST, 0, _STUN_MAGIC) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(request, (host, port))
            data = sock.recv(2048)
        except OSError:
            return False
    if len(data) < 20:
        return False
    kind, _length, magic = struct.unpack(">HHI", data[:8])
    return kind == _BINDING_SUCCESS and magic == _STUN_MAGIC and data[8:20] == transaction


class Coturn:
    """A ``turnserver`` process with ``use-auth-secret`` on one address, for ``browservm serve`` with
    ``run_coturn`` and for tests. Use ``async with Coturn(secret=...) as turn:`` or start()/stop().

    Production runs coturn as its own service; this class exists so that development and CI exercise
    the same credential path as production does.
    """

    def __init__(
        self,
        *,
        secret: str,
        listening_ip: str = "127.0.0.1",
        extra_listening_ips: Sequence[str] = (),
        relay_ip: str | None = None,
        port: int | None = None,
        min_port: int = 49160,
        max_port: int = 49300,
        realm: str = "browservm.local",
        allow_loopback_peers: bool = True,
        work_dir: Path | None = None,
        binary: str = "turnserver",
    ) -> None:
        if not secret:
            raise ValueError("Coturn needs a non-empty secret (BROWSERVM_TURN_SECRET)")
        self.secret = secret
        self.listening_ip = listening_ip
        self.extra_listening_ips = list(extra_listening_ips)
        """More addresses to answer on: the sandbox network's gateway, where guests reach TURN."""
        self.relay_ip = relay_ip or listening_ip
        self.port = port
        self.min_port = min_port
        self.max_port = max_port
        self.realm = realm
        self.allow_loopback_peers = allow_loopback_peers
        self._work_dir = work_dir
        self._own_work_dir: Path | None = None
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        work_dir: Path | None = None,
        extra_listening_ips: Sequence[str] = (),
        relay_ip: str | None = None,
    ) -> Coturn:
        """The coturn ``browservm serve`` runs when ``run_coturn`` is set: it listens where the first
        ``turn:`` URL of ``turn_urls`` points (default ``127.0.0.1:3478``) with ``turn_secret``."""
        if not settings.turn_secret:
            raise CoturnError(
                "BROWSERVM_RUN_COTURN needs BROWSERVM_TURN_SECRET (coturn's static-auth-secret)"
            )
        host, port = "127.0.0.1", 3478
        for url in settings.turn_urls:
            if url.startswith("turn:"):
                address = url.removeprefix("turn:").split("?", 1)[0]
                host, _, port_text = address.rpartition(":")
                if not host:
                    host, port_text = address, "3478"
                port = int(port_text)
                break
        return cls(
            secret=settings.turn_secret,
            listening_ip=host,
            extra_listening_ips=extra_listening_ips,
            relay_ip=relay_ip,
            port=port,
            allow_loopback_peers=host.startswith("127."),
            work_dir=work_dir,
        )

    @property
    def urls(self) -> list[str]:
        if self.port is None:
            raise CoturnError("coturn has no port yet: start it first")
        return [
            f"turn:{self.listening_ip}:{self.port}?transport=udp",
            f"turn:{self.listening_ip}:{self.port}?transport=tcp",
        ]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        return self._dir / "turnserver.log"

    @property
    def _dir(self) -> Path:
        directory = self._work_dir or self._own_work_dir
        if directory is None:
            raise CoturnError("coturn has no work directory yet: start it first")
        return directory

    def command(self) -> list[str]:
        binary = shutil.which(self._binary)
        if binary is None:
            raise CoturnError(f"{self._binary} not found: install coturn (apt-get install coturn)")
        args = [
            binary,
            "-n",  # no configuration file: everything is on this command line
            f"--listening-ip={self.listening_ip}",
            *(f"--listening-ip={ip}" for ip in self.extra_listening_ips),
            f"--relay-ip={self.relay_ip}",
            f"--listening-port={self.port}",
            "--use-auth-secret",
            f"--static-auth-secret={self.secret}",
            f"--realm={self.realm}",
            "--no-tls",
            "--no-dtls",
            # No NAT behaviour discovery: it also binds the port above ours, which nobody reserved for it
            # and which another process may hold (a start-up that failed in CI).
            "--no-rfc5780",
            f"--min-port={self.min_port}",
            f"--max-port={self.max_port}",
            "--no-cli",
            "--fingerprint",
            f"--log-file={self.log_path}",
            "--simple-log",
            "--no-stdout-log",
            f"--pidfile={self._dir / 'turnserver.pid'}",
            f"--db={self._dir / 'turndb'}",
        ]
        if self.allow_loopback_peers:
            # Only because peers on a loopback test bed sit on 127.0.0.0/8; never in production.
            args.append("--allow-loopback-peers")
        return args

    async def start(self, *, timeout_s: float = 10.0) -> None:
        if self._process is not None:
            return
        if self._work_dir is None:
            self._own_work_dir = Path(tempfile.mkdtemp(prefix="browservm-coturn-"))
        else:
            self._work_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.listening_ip)
        self._process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("coturn.starting", pid=self._process.pid, port=self.port, ip=self.listening_ip)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.returncode is not None:
                returncode, tail = self._process.returncode, self._log_tail()
                await self.stop()
                raise CoturnError(f"turnserver exited with {returncode} during start-up; log:\n{tail}")
            # Ready means answering STUN on its UDP port, the same thing a browser will ask of it.
            if await asyncio.to_thread(stun_binding, self.listening_ip, self.port):
                log.info("coturn.ready", pid=self._process.pid, port=self.port)
                return
            if time.monotonic() > deadline:
                tail = self._log_tail()
                await self.stop()
                raise CoturnError(
                    f"turnserver did not answer STUN on {self.listening_ip}:{self.port} "
                    f"within {timeout_s:.0f} s; log:\n{tail}"
                )

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 5.0)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            log.info("coturn.stopped", pid=process.pid, returncode=process.returncode)
        if self._own_work_dir is not None:
            shutil.rmtree(self._own_work_dir, ignore_errors=True)
            self._own_work_dir = None

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    async def __aenter__(self) -> Coturn:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


__all__ = [
    "Coturn",
    "CoturnError",
    "TurnCredential",
    "coturn_port",
    "free_port",
    "guest_turn_urls",
    "ice_servers",
    "stun_binding",
    "turn_credential",
]
