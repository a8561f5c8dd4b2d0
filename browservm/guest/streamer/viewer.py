"""One viewer of the stream: its RTCPeerConnection, a send-only track of the shared encode, and its ``input``
data channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from browservm import protocol
from browservm.guest.capture import Codec, EncodedVideoTrack, VideoSource
from browservm.guest.streamer.aiortc_patches import gather_on_mapped_port, route_feedback

log = logging.getLogger(__name__)

OFFER_APPLIED_WAIT_S = 10.0
"""How long a trickled candidate waits for its peer's offer to be applied."""


class Viewer:
    """Answers one viewer's offer and trickled candidates. What it hears goes to the streamer through
    ``on_state`` (the connection state: ``connected``, ``failed``, ``closed``...), ``on_input`` (a message
    of the ``input`` data channel, with the channel to answer on) and ``on_estimate`` (a new REMB)."""

    def __init__(
        self,
        peer_id: str,
        source: VideoSource,
        codec: Codec,
        ice_servers: list[protocol.IceServer],
        *,
        on_state: Callable[[Viewer, str], Awaitable[None]],
        on_input: Callable[[Any, str | bytes], None],
        on_estimate: Callable[[], None],
        media: protocol.MediaMapping | None = None,
    ) -> None:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

        self.peer_id = peer_id
        self.codec = codec
        config = RTCConfiguration(
            iceServers=[
                RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in ice_servers
            ]
        )
        self.pc: Any = RTCPeerConnection(config)
        self.track = EncodedVideoTrack(source.subscribe())
        self.channel: Any = None
        """The ``input`` RTCDataChannel, once the viewer opened it."""
        self.estimate_kbps: int | None = None
        self.media = media
        """The sandbox's public UDP mapping, gathered on beside the usual candidates."""
        self._offer_applied = asyncio.Event()
        self._on_input = on_input
        self._on_estimate = on_estimate

        async def state_changed() -> None:
            await on_state(self, self.pc.connectionState)

        self.pc.on("connectionstatechange", state_changed)
        self.pc.on("datachannel", self._adopt_channel)

    async def answer(self, offer: str) -> str:
        """Apply the viewer's offer; the answer SDP, complete with this side's candidates."""
        from aiortc import RTCRtpSender, RTCSessionDescription

        # The transceiver and its codec preference must exist before the offer is applied: aiortc
        # negotiates codecs inside setRemoteDescription and adopts a matching unassigned transceiver.
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        wanted = f"video/{self.codec}"
        transceiver.setCodecPreferences(
            [
                c
                for c in RTCRtpSender.getCapabilities("video").codecs
                if c.mimeType.lower() in (wanted, "video/rtx")
            ]
        )
        route_feedback(transceiver.sender, self.track.subscription.request_keyframe, self._estimated)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            self._offer_applied.set()
        except Exception as exc:
            if "send parameters" in str(exc):
                raise protocol.RequestError(
                    "codec_unsupported",
                    f"the viewer's offer does not accept {self.codec}, the only codec this session streams",
                ) from exc
            raise
        if transceiver.mid is None:
            raise protocol.RequestError(
                "bad_offer", "the offer has no video section; add a recvonly video transceiver"
            )
        if self.media is not None:
            # After the offer (BUNDLE has left one transport), before the answer gathers.
            for connection in self._ice_connections():
                gather_on_mapped_port(connection, self.media)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    def _ice_connections(self) -> list[Any]:
        """The aioice connections of this peer's transports (one when bundled)."""
        transports = [t.sender.transport for t in self.pc.getTransceivers()]
        if self.pc.sctp is not None:
            transports.append(self.pc.sctp.transport)
        connections = {
            id(t.transport.iceGatherer._connection): t.transport.iceGatherer._connection for t in transports
        }
        return list(connections.values())

    async def add_candidate(self, line: str, candidate: dict[str, Any]) -> None:
        """Apply a trickled remote candidate (``line`` is its ``candidate`` attribute)."""
        from aiortc.sdp import candidate_from_sdp

        try:
            await asyncio.wait_for(self._offer_applied.wait(), OFFER_APPLIED_WAIT_S)
        except TimeoutError:
            raise protocol.RequestError(
                "bad_candidate", f"peer {self.peer_id!r} never had its offer applied"
            ) from None
        try:
            parsed = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
            parsed.sdpMid = candidate.get("sdpMid")
            parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
            if parsed.sdpMid is None and parsed.sdpMLineIndex is None:
                parsed.sdpMLineIndex = 0
            await self.pc.addIceCandidate(parsed)
        except Exception as exc:
            raise protocol.RequestError(
                "bad_candidate", f"cannot apply candidate {line[:120]!r}: {exc}"
            ) from exc

    def send(self, message: str) -> None:
        """A message to the viewer's ``input`` channel, if it is open (the remote clipboard)."""
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(message)

    async def close(self) -> None:
        self.track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()

    def _estimated(self, kbps: int) -> None:
        self.estimate_kbps = kbps
        self._on_estimate()

    def _adopt_channel(self, channel: Any) -> None:
        if channel.label != "input":
            return
        self.channel = channel
        channel.on("message", lambda raw: self._on_input(channel, raw))
