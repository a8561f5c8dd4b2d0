"""One viewer peer connection at the session's streamer, reached through the session's channel.

Both front doors (the signaling WebSocket, :mod:`browservm.controller.api.signal`, and WHEP,
:mod:`browservm.controller.api.whep`) hand the page's offer and candidates to a :class:`PeerRelay`,
which speaks :class:`browservm.protocol.Signal` to the streamer; the streamer's candidates and state come
back as :class:`browservm.protocol.SignalEvent` events on the channel.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from typing import Any

from browservm import protocol
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed

OFFER_TIMEOUT_S = 20.0
"""The streamer answers after gathering its candidates; a cold streamer needs up to about a second."""
SIGNAL_TIMEOUT_S = 5.0
MAX_SDP = 64 * 1024
OFFER_REFUSAL_STATUS = {"bad_request": 400, "bad_offer": 400, "codec_unsupported": 400, "not_ready": 409}
"""The streamer's refusals that are the offer's fault (or a moment's): not a 502 of ours."""


def new_peer_id(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(9)}"


class PeerRelay:
    """One viewer peer connection at the streamer, reached through the session's channel."""

    def __init__(self, channel: Channel, peer_id: str) -> None:
        self.channel = channel
        self.peer_id = peer_id
        self.closed = False

    async def offer(self, sdp: str) -> str:
        """Hand the page's offer to the streamer; return its answer SDP (complete: aiortc gathers first)."""
        answer = await self.channel.request(
            protocol.Signal(peer_id=self.peer_id, kind="offer", sdp=sdp), timeout_s=OFFER_TIMEOUT_S
        )
        if not answer.sdp:
            raise AgentError("bad_answer", "the streamer replied to the offer without an answer SDP")
        return answer.sdp

    async def candidate(self, candidate: Mapping[str, Any] | None) -> None:
        """Trickle one of the page's candidates (``None``: end of candidates) to the streamer."""
        await self.channel.request(
            protocol.Signal(
                peer_id=self.peer_id,
                kind="candidate",
                candidate=dict(candidate) if candidate is not None else None,
            ),
            timeout_s=SIGNAL_TIMEOUT_S,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Best effort: the streamer also drops peers whose ICE dies.
        with contextlib.suppress(AgentError, ChannelClosed, ConnectionError, TimeoutError):
            await self.channel.request(
                protocol.Signal(peer_id=self.peer_id, kind="close"),
                timeout_s=SIGNAL_TIMEOUT_S,
            )
