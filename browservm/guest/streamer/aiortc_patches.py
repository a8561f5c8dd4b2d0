"""Where the streamer reaches into aiortc and aioice, and why: each is something their public API lacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from browservm import protocol

log = logging.getLogger(__name__)


def restrict_host_addresses(addresses: list[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses``.

    aioice skips 127.0.0.1 on its own, so a loopback-only test bed would gather nothing without this.
    """
    import aioice.ice

    chosen = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


def gather_on_mapped_port(connection: Any, media: protocol.MediaMapping) -> None:
    """Make one aioice ``Connection`` also gather on the host's 1:1 mapping of a public UDP port.

    Besides its own candidates it binds ``guest_address:guest_port`` (the port the host maps from
    ``public_ip:public_port``) and advertises only ``public_ip:public_port``, as a server-reflexive
    candidate of that socket: a viewer's checks to it arrive there, and the answers leave through the
    mapping as if from the public address. aioice has no way to bind a given port or to add a candidate
    it did not discover. A second viewer of the same sandbox finds the port taken and goes through TURN.
    """
    import aioice.ice
    from aioice.candidate import Candidate, candidate_foundation, candidate_priority

    original = connection.get_component_candidates

    async def get_component_candidates(component: int, addresses: list[str], timeout: int = 5) -> list[Any]:
        candidates: list[Any] = await original(component=component, addresses=addresses, timeout=timeout)
        loop = asyncio.get_running_loop()
        try:
            _transport, mapped = await loop.create_datagram_endpoint(
                lambda: aioice.ice.StunProtocol(connection),
                local_addr=(media.guest_address, media.guest_port),
            )
        except OSError as exc:
            log.info("mapped port %s:%s is taken (%s): this viewer goes through TURN",
                     media.guest_address, media.guest_port, exc)  # fmt: skip
            return candidates
        # The socket's own candidate, for pairing; never advertised (nothing outside reaches it).
        mapped.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", media.guest_address),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=media.guest_address,
            port=media.guest_port,
            type="host",
        )
        connection._protocols.append(mapped)
        # Advertised as a host candidate, as pion's and Janus's 1:1 NAT settings do: the address is this
        # socket's own as far as anyone outside can tell, and a host candidate's priority puts the
        # mapped path before any through a relay.
        candidates.append(
            Candidate(
                foundation=candidate_foundation("host", "udp", media.public_ip),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=media.public_ip,
                port=media.public_port,
                type="host",
            )
        )
        return candidates

    connection.get_component_candidates = get_component_candidates


def route_feedback(
    sender: Any, request_keyframe: Callable[[], None], on_estimate: Callable[[int], None]
) -> None:
    """Route a viewer's PLI/FIR to ``request_keyframe`` and its REMB (kbit/s) to ``on_estimate``.

    aiortc's ``RTCRtpSender`` handles both only for frames it encodes itself; ours arrive encoded.
    """
    from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

    sender._send_keyframe = request_keyframe
    original = sender._handle_rtcp_packet

    async def handle_rtcp(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            with contextlib.suppress(ValueError):
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
                if sender._ssrc in ssrcs:
                    on_estimate(bitrate // 1000)
        await original(packet)

    sender._handle_rtcp_packet = handle_rtcp
