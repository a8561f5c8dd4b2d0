"""The WebRTC streamer: one process per guest display, one RTCPeerConnection per viewer.

Run::

    python -m browservm.guest.streamer --display :N --socket PATH --width W --height H --fps F \\
        --codec h264|vp8 --min-kbps A --max-kbps B --ice-servers JSON [--host-addresses 127.0.0.1] \\
        [--capture auto|pixelflux|x11grab]

``--host-addresses`` makes ICE gather host candidates on exactly those addresses. When all of them are
loopback, the streamer also ignores remote candidates (in the offer and trickled) and ICE servers that are
not on loopback, so a loopback-only test bed never sends a packet elsewhere.

It listens on the unix socket ``PATH`` and speaks :mod:`browservm.protocol` frames. On every connection
it first sends ``ServiceState(service="streamer")``: ``starting`` until a first encoded frame exists, then
``ready`` (also pushed to every connection when it turns ready), or ``failed`` with the reason.

Requests it answers (each with one :class:`~browservm.protocol.Reply`):

* ``Signal(kind="offer")``: the viewer's offer (a recvonly video transceiver and a data channel named
  ``input``). The reply carries ``{"sdp": answer, "type": "answer"}``, complete with all candidates (aiortc
  gathers before answering). An offer for a ``peer_id`` that exists replaces that peer (ICE restart or
  reconnect).
* ``Signal(kind="candidate")``: a trickled remote candidate, applied to that peer; end-of-candidates
  (``candidate`` ``None`` or empty) is accepted and ignored.
* ``Signal(kind="close")``: ends that viewer's peer connection.
* ``Status``: ``{"state", "capture", "codec", "viewers", "frames", "bytes", "bitrate_kbps"}`` (frames and
  bytes encoded since start).
* ``Shutdown``: replies, then stops the process.

Events it sends to every connection: ``SignalEvent(kind="connected")`` when a viewer's connection state
becomes connected, ``SignalEvent(kind="closed")`` when it fails or closes, and ``ServiceState`` changes.

Capture is pixelflux unless ``--capture x11grab`` (or ``BROWSERVM_STREAMER_CAPTURE=x11grab``) forces the
PyAV fallback; ``auto`` falls back by itself when pixelflux cannot start or yields no frame. The input
data channel's message set is documented in :mod:`browservm.guest.xinput`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError

from browservm import protocol
from browservm.guest.capture import (
    REFRESH_S,
    CaptureUnavailable,
    Codec,
    EncodedVideoTrack,
    VideoSource,
    create_source,
)
from browservm.guest.xinput import ClipboardBridge, InputHandler, InputUnavailable, XInput

log = logging.getLogger("browservm.streamer")

FIRST_FRAME_TIMEOUT_S = 5.0
"""How long ``auto`` waits for pixelflux's first frame before it falls back to x11grab."""
WATCHDOG_INTERVAL_S = 1.0

CaptureKind = Literal["auto", "pixelflux", "x11grab"]


@dataclass(frozen=True)
class StreamerOptions:
    display: str
    socket: Path
    width: int
    height: int
    fps: int
    codec: Codec
    min_kbps: int
    max_kbps: int
    ice_servers: list[protocol.IceServer] = field(default_factory=list)
    host_addresses: list[str] = field(default_factory=list)
    capture: CaptureKind = "auto"
    refresh_s: float = REFRESH_S


class SignalError(Exception):
    """A signaling request could not be carried out; ``code`` goes into the reply's error body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def restrict_host_addresses(addresses: list[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses``.

    aioice skips 127.0.0.1 on its own, so a loopback-only test bed would gather nothing without this.
    """
    import aioice.ice

    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


def is_loopback_only(addresses: list[str]) -> bool:
    """Whether ``addresses`` is a non-empty list of loopback addresses (a loopback-only test bed)."""
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def is_loopback_candidate(line: str) -> bool:
    """Whether an ICE candidate line (``candidate:f 1 udp prio ADDRESS port typ ...``) names a loopback IP.

    An mDNS name (``*.local``) counts as not loopback: resolving it would send multicast off loopback.
    """
    parts = line.removeprefix("a=").split()
    if len(parts) < 6:
        return False
    try:
        return ipaddress.ip_address(parts[4]).is_loopback
    except ValueError:
        return False


def drop_non_loopback_candidates(sdp: str) -> str:
    """``sdp`` without the ``a=candidate`` lines that name a non-loopback address."""
    lines = sdp.split("\r\n")
    kept = [line for line in lines if not line.startswith("a=candidate:") or is_loopback_candidate(line)]
    return "\r\n".join(kept)


def is_loopback_ice_server(server: protocol.IceServer) -> bool:
    """Whether every URL of ``server`` (``stun:``/``turn:``/``turns:`` ``host[:port][?…]``) is on loopback."""
    for url in server.urls:
        rest = url.split(":", 1)[-1].split("?", 1)[0]
        host = rest[1:].split("]", 1)[0] if rest.startswith("[") else rest.rsplit(":", 1)[0]
        if host != "localhost":
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    return False
            except ValueError:
                return False
    return True


@dataclass
class Viewer:
    peer_id: str
    pc: Any  # RTCPeerConnection
    track: EncodedVideoTrack
    channel: Any = None  # RTCDataChannel "input"
    estimate_kbps: int | None = None
    offer_applied: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the offer is applied: a candidate trickled before that waits for it."""


class Streamer:
    def __init__(self, options: StreamerOptions) -> None:
        self.options = options
        self.state: protocol.ServiceStateName = "starting"
        self.detail = ""
        self.source: VideoSource | None = None
        self.viewers: dict[str, Viewer] = {}
        self._clients: set[asyncio.StreamWriter] = set()
        self._stop = asyncio.Event()
        self._input: InputHandler | None = None
        self._xinput: XInput | None = None
        self._clipboard: ClipboardBridge | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.loopback_only = is_loopback_only(options.host_addresses)
        """Restricted to loopback: remote candidates and ICE servers elsewhere are ignored, so that no
        packet leaves loopback (test beds whose rules forbid any other traffic)."""
        self.ice_servers = self._usable(options.ice_servers)

    def _usable(self, servers: list[protocol.IceServer]) -> list[protocol.IceServer]:
        usable = [s for s in servers if not self.loopback_only or is_loopback_ice_server(s)]
        if len(usable) < len(servers):
            log.warning(
                "ignoring %d ICE server(s) off loopback: the streamer gathers on loopback only",
                len(servers) - len(usable),
            )
        return usable

    # ------------------------------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until stopped; the exit status is 0 on a requested stop, 1 when the capture failed."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        if self.options.host_addresses:
            restrict_host_addresses(self.options.host_addresses)
        self.options.socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve_client, path=str(self.options.socket))
        os.chmod(self.options.socket, 0o600)
        status = 0
        try:
            try:
                await self._start_capture()
                self._start_input()
                self._set_state("ready")
            except CaptureUnavailable as exc:
                log.error("%s", exc)
                self._set_state("failed", str(exc))
                await self._drain_clients()
                return 1
            stop = asyncio.create_task(self._stop.wait())
            watchdog = asyncio.create_task(self._watch_capture())
            done, _ = await asyncio.wait({stop, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, watchdog):
                task.cancel()
            if watchdog in done and not watchdog.cancelled() and watchdog.exception() is None:
                status = 1
        finally:
            await self._shutdown()
        return status

    async def _start_capture(self) -> None:
        o = self.options
        kinds: list[Literal["pixelflux", "x11grab"]] = (
            ["pixelflux", "x11grab"] if o.capture == "auto" else [o.capture]
        )
        errors = []
        for kind in kinds:
            source = create_source(
                kind,
                o.display,
                o.width,
                o.height,
                o.fps,
                o.codec,
                o.min_kbps,
                o.max_kbps,
                refresh_s=o.refresh_s,
            )
            started = time.monotonic()
            try:
                await source.start()
                try:
                    await asyncio.wait_for(source.first_frame.wait(), FIRST_FRAME_TIMEOUT_S)
                except TimeoutError:
                    raise CaptureUnavailable(
                        f"{kind} produced no frame within {FIRST_FRAME_TIMEOUT_S:.0f} s"
                    ) from None
            except CaptureUnavailable as exc:
                source.stop()
                errors.append(str(exc))
                log.warning("capture %s unavailable: %s", kind, exc)
                continue
            log.info(
                "capturing %s with %s (%s %dx%d@%d), first frame after %.0f ms",
                o.display,
                kind,
                o.codec,
                o.width,
                o.height,
                o.fps,
                (time.monotonic() - started) * 1000,
            )
            self.source = source
            return
        raise CaptureUnavailable("no capture source works: " + "; ".join(errors))

    def _start_input(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._xinput = XInput(self.options.display)
        except InputUnavailable as exc:
            log.warning("input disabled: %s", exc)
            return
        try:

            def on_remote_copy(text: str) -> None:  # the clipboard bridge's thread
                loop.call_soon_threadsafe(self._remote_clipboard, text)

            self._clipboard = ClipboardBridge(self.options.display, on_remote_copy)
        except InputUnavailable as exc:
            log.warning("clipboard disabled: %s", exc)
        self._input = InputHandler(self._xinput, self._clipboard)

    async def _watch_capture(self) -> None:
        """Returns (ending the process with status 1) when the capture dies, so the supervisor restarts us."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            failure = self.source.failure() if self.source else None
            if self.source is not None:
                log.debug(
                    "capture %s: %d frames, %d viewers, %d kbit/s target",
                    self.source.name,
                    self.source.frames,
                    self.source.viewers,
                    self.source.bitrate_kbps,
                )
            if failure:
                log.error("%s", failure)
                self._set_state("failed", failure)
                await self._drain_clients()
                return

    async def _shutdown(self) -> None:
        for peer_id in list(self.viewers):
            await self._close_peer(peer_id, notify=False)
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.close()
        if self.source is not None:
            self.source.stop()
        if self._clipboard is not None:
            self._clipboard.close()
        if self._xinput is not None:
            self._xinput.close()
        self.options.socket.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ channel

    def _set_state(self, state: protocol.ServiceStateName, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self._broadcast(self._state_message())

    def _state_message(self) -> protocol.ServiceState:
        return protocol.ServiceState(service="streamer", state=self.state, detail=self.detail)

    def _broadcast(self, message: BaseModel) -> None:
        frame = protocol.encode_message(message)
        for writer in list(self._clients):
            if writer.is_closing():
                self._clients.discard(writer)
            else:
                writer.write(frame)

    async def _drain_clients(self) -> None:
        for writer in list(self._clients):
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        writer.write(protocol.encode_message(self._state_message()))
        try:
            while True:
                try:
                    frame = await protocol.read_frame(reader)
                except protocol.UnknownMessage as exc:
                    if exc.request_id is not None:
                        writer.write(self._error(exc.request_id, "unknown_type", str(exc)))
                    continue
                if frame is None:
                    break
                kind, message = frame
                if kind != protocol.FRAME_MESSAGE or not isinstance(message, BaseModel):
                    continue
                # Answer concurrently: an offer takes a while (ICE gathering) and must not hold up a
                # candidate or a close for another viewer.
                task = asyncio.create_task(self._answer(message, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (protocol.ProtocolError, ConnectionError) as exc:
            log.warning("channel client dropped: %s", exc)
        finally:
            self._clients.discard(writer)
            writer.close()

    @staticmethod
    def _error(request_id: int, code: str, message: str) -> bytes:
        return protocol.encode_message(
            protocol.Reply(id=request_id, ok=False, error=protocol.ErrorBody(code=code, message=message))
        )

    async def _answer(self, message: BaseModel, writer: asyncio.StreamWriter) -> None:
        request_id = getattr(message, "id", None)
        try:
            result = await self._handle(message)
        except SignalError as exc:
            reply = self._error(request_id or 0, exc.code, str(exc))
        except Exception as exc:
            log.exception("request %s failed", type(message).__name__)
            reply = self._error(request_id or 0, "internal", f"{type(exc).__name__}: {exc}")
        else:
            if request_id is None:
                return
            reply = protocol.encode_message(protocol.Reply(id=request_id, ok=True, result=result))
        if request_id is not None and not writer.is_closing():
            writer.write(reply)

    async def _handle(self, message: BaseModel) -> dict[str, Any]:
        if isinstance(message, protocol.Signal):
            return await self.signal(message)
        if isinstance(message, protocol.Status):
            return self.status()
        if isinstance(message, protocol.Shutdown):
            self._stop.set()
            return {}
        if getattr(message, "id", None) is None:
            return {}  # events from the peer: nothing to do
        raise SignalError(
            "unsupported", f"the streamer does not handle {getattr(message, 'type', '?')!r} requests"
        )

    def status(self) -> dict[str, Any]:
        source = self.source
        return {
            "state": self.state,
            "capture": source.name if source else None,
            "codec": self.options.codec,
            "viewers": len(self.viewers),
            "frames": source.frames if source else 0,
            "bytes": source.bytes if source else 0,
            "bitrate_kbps": source.bitrate_kbps if source else None,
        }

    # ------------------------------------------------------------------------------------------ signaling

    async def signal(self, message: protocol.Signal) -> dict[str, Any]:
        if message.kind == "offer":
            if not message.sdp:
                raise SignalError("bad_request", "an offer needs its sdp")
            servers = self.ice_servers if message.ice_servers is None else self._usable(message.ice_servers)
            return await self._offer(message.peer_id, message.sdp, servers)
        if message.kind == "candidate":
            await self._candidate(message.peer_id, message.candidate)
            return {}
        if message.kind == "close":
            await self._close_peer(message.peer_id, notify=True)
            return {}
        raise SignalError("bad_request", "the streamer answers offers; it never takes an answer")

    async def _offer(self, peer_id: str, sdp: str, ice_servers: list[protocol.IceServer]) -> dict[str, Any]:
        from aiortc import (
            RTCConfiguration,
            RTCIceServer,
            RTCPeerConnection,
            RTCRtpSender,
            RTCSessionDescription,
        )

        if self.source is None or self.state != "ready":
            raise SignalError("not_ready", f"the streamer is {self.state}; retry once it reports ready")
        if peer_id in self.viewers:  # ICE restart / reconnect: the new offer replaces the old peer
            await self._close_peer(peer_id, notify=False)
        config = RTCConfiguration(
            iceServers=[
                RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in ice_servers
            ]
        )
        pc = RTCPeerConnection(config)
        track = EncodedVideoTrack(self.source.subscribe())
        viewer = Viewer(peer_id, pc, track)
        self.viewers[peer_id] = viewer
        try:
            # The transceiver and its codec preference must exist before the offer is applied: aiortc
            # negotiates codecs inside setRemoteDescription and adopts a matching unassigned transceiver.
            transceiver = pc.addTransceiver(track, direction="sendonly")
            wanted = f"video/{self.options.codec}"
            transceiver.setCodecPreferences(
                [
                    c
                    for c in RTCRtpSender.getCapabilities("video").codecs
                    if c.mimeType.lower() in (wanted, "video/rtx")
                ]
            )
            self._hook_sender(viewer, transceiver.sender)
            self._watch_peer(viewer)
            if self.loopback_only:
                sdp = drop_non_loopback_candidates(sdp)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                viewer.offer_applied.set()
            except Exception as exc:
                if "send parameters" in str(exc):
                    raise SignalError(
                        "codec_unsupported",
                        f"the viewer's offer does not accept {self.options.codec}, the only codec this "
                        "session streams",
                    ) from exc
                raise
            if transceiver.mid is None:
                raise SignalError(
                    "bad_offer", "the offer has no video section; add a recvonly video transceiver"
                )
            await pc.setLocalDescription(await pc.createAnswer())
        except SignalError:
            await self._close_peer(peer_id, notify=False)
            raise
        except Exception as exc:
            await self._close_peer(peer_id, notify=False)
            raise SignalError("bad_offer", f"cannot answer the offer: {exc}") from exc
        answer = pc.localDescription.sdp
        return {"sdp": answer, "type": "answer"}

    def _hook_sender(self, viewer: Viewer, sender: Any) -> None:
        """Route the viewer's PLI/FIR to a source keyframe and its REMB to the source bitrate.

        aiortc's sender handles both only for frames it encodes itself; ours arrive encoded.
        """
        from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

        sender._send_keyframe = viewer.track.subscription.request_keyframe
        original = sender._handle_rtcp_packet

        async def handle_rtcp(packet: Any) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                with contextlib.suppress(ValueError):
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                    if sender._ssrc in ssrcs:
                        viewer.estimate_kbps = bitrate // 1000
                        self._follow_estimates()
            await original(packet)

        sender._handle_rtcp_packet = handle_rtcp

    def _follow_estimates(self) -> None:
        estimates = [v.estimate_kbps for v in self.viewers.values() if v.estimate_kbps]
        if estimates and self.source is not None:
            self.source.set_bitrate(min(estimates))  # one encode serves all: the slowest path sets the rate

    def _watch_peer(self, viewer: Viewer) -> None:
        pc = viewer.pc

        async def on_state() -> None:
            if self.viewers.get(viewer.peer_id) is not viewer:
                return  # a replaced peer: its successor speaks for this peer_id
            log.info("viewer %s: %s", viewer.peer_id, pc.connectionState)
            if pc.connectionState == "connected":
                self._broadcast(protocol.SignalEvent(peer_id=viewer.peer_id, kind="connected"))
            elif pc.connectionState in ("failed", "closed"):
                await self._close_peer(viewer.peer_id, notify=True)

        def on_datachannel(channel: Any) -> None:
            if channel.label != "input":
                return
            viewer.channel = channel

            def on_message(raw: str | bytes) -> None:
                if self._input is None:
                    return
                reply = self._input.handle(raw)
                if reply is None and self.source is not None:
                    self.source.note_input()  # the page answers input: stream its answer at once
                elif reply is not None and channel.readyState == "open":
                    channel.send(reply)

            channel.on("message", on_message)

        pc.on("connectionstatechange", on_state)
        pc.on("datachannel", on_datachannel)

    async def _candidate(self, peer_id: str, candidate: dict[str, Any] | None) -> None:
        from aiortc.sdp import candidate_from_sdp

        viewer = self.viewers.get(peer_id)
        if viewer is None:
            raise SignalError("unknown_peer", f"no peer {peer_id!r}; send its offer first")
        line = (candidate or {}).get("candidate") or ""
        if not line:
            return  # end-of-candidates: aiortc needs no notice
        if self.loopback_only and not is_loopback_candidate(line):
            log.debug("peer %s: ignoring a candidate off loopback: %s", peer_id, line[:120])
            return
        try:
            await asyncio.wait_for(viewer.offer_applied.wait(), 10)
        except TimeoutError:
            raise SignalError("bad_candidate", f"peer {peer_id!r} never had its offer applied") from None
        try:
            parsed = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
            parsed.sdpMid = (candidate or {}).get("sdpMid")
            parsed.sdpMLineIndex = (candidate or {}).get("sdpMLineIndex")
            if parsed.sdpMid is None and parsed.sdpMLineIndex is None:
                parsed.sdpMLineIndex = 0
            await viewer.pc.addIceCandidate(parsed)
        except Exception as exc:
            raise SignalError("bad_candidate", f"cannot apply candidate {line[:120]!r}: {exc}") from exc

    async def _close_peer(self, peer_id: str, notify: bool) -> None:
        viewer = self.viewers.pop(peer_id, None)
        if viewer is None:
            return
        viewer.track.stop()
        if self._input is not None:
            self._input.release_all()  # a viewer that vanished mid-drag must not leave keys held
        with contextlib.suppress(Exception):
            await viewer.pc.close()
        self._follow_estimates()
        if notify:
            self._broadcast(protocol.SignalEvent(peer_id=peer_id, kind="closed"))

    def _remote_clipboard(self, text: str) -> None:
        message = json.dumps({"t": "clipboard", "text": text})
        for viewer in self.viewers.values():
            if viewer.channel is not None and viewer.channel.readyState == "open":
                viewer.channel.send(message)


# ---------------------------------------------------------------------------------------------- CLI

_ICE_SERVERS: TypeAdapter[list[protocol.IceServer]] = TypeAdapter(list[protocol.IceServer])


def parse_args(argv: list[str] | None = None) -> StreamerOptions:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.guest.streamer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--display", required=True, help="X display to stream, e.g. :99")
    parser.add_argument(
        "--socket", required=True, type=Path, help="unix socket to serve the channel protocol on"
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--codec", choices=["h264", "vp8"], default="h264")
    parser.add_argument("--min-kbps", type=int, default=300)
    parser.add_argument("--max-kbps", type=int, default=6000)
    parser.add_argument("--ice-servers", default="[]", help='JSON list of {"urls", "username", "credential"}')
    parser.add_argument(
        "--host-addresses",
        default=os.environ.get("BROWSERVM_STREAMER_HOST_ADDRESSES", ""),
        help="comma-separated addresses to gather ICE host candidates on (loopback test beds)",
    )
    parser.add_argument(
        "--capture",
        choices=["auto", "pixelflux", "x11grab"],
        default=os.environ.get("BROWSERVM_STREAMER_CAPTURE", "auto"),
    )
    parser.add_argument(
        "--refresh-s",
        type=float,
        default=REFRESH_S,
        help="seconds between frames of a still screen (they repair a lost frame)",
    )
    parser.add_argument("--log-level", default=os.environ.get("BROWSERVM_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    try:
        ice_servers = _ICE_SERVERS.validate_json(args.ice_servers)
    except ValidationError as exc:
        parser.error(
            f"--ice-servers is not a JSON list of {{urls, username, credential}}: {exc.errors()[0]['msg']}"
        )
    host_addresses = [a.strip() for a in args.host_addresses.split(",") if a.strip()]
    for address in host_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            parser.error(f"--host-addresses: {address!r} is not an IP address (e.g. 127.0.0.1)")
    if not 0.1 <= args.refresh_s <= 60:
        parser.error("--refresh-s must be between 0.1 and 60 seconds")
    if not 0 < args.min_kbps <= args.max_kbps:
        parser.error("--min-kbps must be positive and not above --max-kbps")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return StreamerOptions(
        display=args.display,
        socket=args.socket,
        width=args.width,
        height=args.height,
        fps=args.fps,
        codec=args.codec,
        min_kbps=args.min_kbps,
        max_kbps=args.max_kbps,
        ice_servers=ice_servers,
        host_addresses=host_addresses,
        capture=args.capture,
        refresh_s=args.refresh_s,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)

    async def run() -> int:
        return await Streamer(options).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
