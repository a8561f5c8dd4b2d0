"""The loopback ICE policy: a streamer restricted to loopback addresses aims no packet anywhere else.

When every address the streamer gathers on is loopback (a test bed whose rules forbid other traffic), it
also ignores remote candidates (in the offer and trickled) and ICE servers that are not on loopback. An
mDNS candidate (``*.local``) counts as not loopback: resolving it would send multicast off loopback.
"""

from __future__ import annotations

import ipaddress

from browservm import protocol


def is_loopback_only(addresses: list[str]) -> bool:
    """Whether ``addresses`` is a non-empty list of loopback addresses (a loopback-only test bed)."""
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def is_loopback_candidate(line: str) -> bool:
    """Whether an ICE candidate line (``candidate:f 1 udp prio ADDRESS port typ ...``) names a loopback IP."""
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
