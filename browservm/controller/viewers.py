"""The viewers a controller holds, per session: its open signaling and VNC sockets and its WHEP resources.

One service behind :class:`ViewerRegistry`. It lives in this process's memory today
(:class:`LocalViewers`); controllers on several hosts would share one through PostgreSQL ``LISTEN/NOTIFY``
behind the same interface, with a WHEP resource's requests routed to the controller holding its relay.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from browservm.controller.relay import PeerRelay

SocketKind = Literal["signal", "vnc"]

MAX_SOCKETS_PER_SESSION = 4
"""Each signaling socket costs a peer connection and an encoder in the guest: a few tabs, not a crowd
(the same bound for VNC sockets, each an RFB connection to x11vnc)."""
MAX_WHEP_PEERS_PER_SESSION = 4
"""WHEP peers have no connection whose end we see; past this many, the oldest one is closed."""


class TooManyViewers(Exception):
    def __init__(self, kind: SocketKind, limit: int) -> None:
        super().__init__(f"this session already has {limit} {kind} sockets connected")
        self.kind = kind
        self.limit = limit


@dataclass
class WhepPeer:
    """A WHEP resource: its relay to the streamer, the ETag naming its ICE session, the offer's ufrag."""

    session_id: str
    relay: PeerRelay
    etag: str
    ice_ufrag: str | None

    @property
    def peer_id(self) -> str:
        return self.relay.peer_id


class ViewerRegistry(abc.ABC):
    @abc.abstractmethod
    def socket(self, kind: SocketKind, session_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold one of the session's ``kind`` socket places while the block runs.

        Raises :class:`TooManyViewers` when the session has all of them taken."""

    @abc.abstractmethod
    def add_whep(self, peer: WhepPeer) -> list[WhepPeer]:
        """Register a WHEP resource; return those it displaces (to be closed by the caller): the
        session's oldest past :data:`MAX_WHEP_PEERS_PER_SESSION`, and any whose sandbox went away."""

    @abc.abstractmethod
    def whep(self, session_id: str, peer_id: str) -> WhepPeer | None:
        """The session's WHEP resource ``peer_id``, if this registry holds it."""

    @abc.abstractmethod
    def remove_whep(self, peer_id: str) -> WhepPeer | None: ...


class LocalViewers(ViewerRegistry):
    """The registry of one controller process."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[SocketKind, str], int] = {}
        self._whep: dict[str, WhepPeer] = {}  # in creation order: the oldest first

    @contextlib.contextmanager
    def socket(self, kind: SocketKind, session_id: str) -> Iterator[None]:
        key = (kind, session_id)
        if self._sockets.get(key, 0) >= MAX_SOCKETS_PER_SESSION:
            raise TooManyViewers(kind, MAX_SOCKETS_PER_SESSION)
        self._sockets[key] = self._sockets.get(key, 0) + 1
        try:
            yield
        finally:
            self._sockets[key] -= 1
            if not self._sockets[key]:
                del self._sockets[key]

    def sockets(self, kind: SocketKind, session_id: str) -> int:
        return self._sockets.get((kind, session_id), 0)

    def add_whep(self, peer: WhepPeer) -> list[WhepPeer]:
        displaced = [p for p in self._whep.values() if p.relay.channel.closed.is_set()]
        same = [p for p in self._whep.values() if p.session_id == peer.session_id and p not in displaced]
        displaced += same[: max(0, len(same) - MAX_WHEP_PEERS_PER_SESSION + 1)]
        for gone in displaced:
            del self._whep[gone.peer_id]
        self._whep[peer.peer_id] = peer
        return displaced

    def whep(self, session_id: str, peer_id: str) -> WhepPeer | None:
        peer = self._whep.get(peer_id)
        return peer if peer is not None and peer.session_id == session_id else None

    def remove_whep(self, peer_id: str) -> WhepPeer | None:
        return self._whep.pop(peer_id, None)
