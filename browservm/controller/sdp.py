"""The little of SDP the controller reads: an offer's ICE username fragment, and trickled candidates."""

from __future__ import annotations

from typing import Any


def ice_ufrag(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.split(":", 1)[1].strip()
    return None


def parse_sdpfrag(body: str) -> tuple[str | None, list[dict[str, Any] | None]]:
    """The ``ice-ufrag`` and candidates of a trickle-ice-sdpfrag (RFC 8840); ``None`` ends candidates."""
    ufrag: str | None = None
    mid: str | None = None
    index = -1
    candidates: list[dict[str, Any] | None] = []
    for raw in body.splitlines():
        line = raw.strip()
        if line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1].strip()
        elif line.startswith("m="):
            index += 1
        elif line.startswith("a=mid:"):
            mid = line.split(":", 1)[1].strip()
        elif line.startswith("a=candidate:"):
            candidates.append(
                {
                    "candidate": line[2:],
                    "sdpMid": mid or "0",
                    "sdpMLineIndex": max(index, 0),
                    "usernameFragment": ufrag,
                }
            )
        elif line == "a=end-of-candidates":
            candidates.append(None)
    return ufrag, candidates
