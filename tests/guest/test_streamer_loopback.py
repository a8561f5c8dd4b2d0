"""A streamer restricted to loopback addresses never aims a packet elsewhere: remote candidates and ICE
servers off loopback are ignored. (Its media over loopback is tested end to end in
tests/web/test_webrtc_e2e.py, inside a network namespace.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from browservm import protocol
from browservm.guest.capture import CaptureConfig
from browservm.guest.streamer.loopback import (
    drop_non_loopback_candidates,
    is_loopback_candidate,
    is_loopback_only,
)
from browservm.guest.streamer.options import StreamerOptions, parse_args
from browservm.guest.streamer.server import Streamer

OFFER = "\r\n".join(
    [
        "v=0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host generation 0",
        "a=candidate:2 1 udp 2113937151 192.168.1.20 50001 typ host generation 0",
        "a=candidate:3 1 udp 2113937151 0f3c9a1e-7d2b-4c1a-9f0e-1b2c3d4e5f60.local 50002 typ host",
        "a=candidate:4 1 udp 1677729535 203.0.113.7 50003 typ srflx raddr 0.0.0.0 rport 0",
        "a=candidate:5 1 udp 2113937151 ::1 50004 typ host",
        "a=end-of-candidates",
        "",
    ]
)


def options(host_addresses: list[str], ice_servers: list[protocol.IceServer]) -> StreamerOptions:
    return StreamerOptions(
        socket=Path("/nonexistent/streamer.sock"),
        capture=CaptureConfig(
            ":1", width=1280, height=720, fps=30, codec="h264", min_kbps=300, max_kbps=4000
        ),
        ice_servers=ice_servers,
        host_addresses=host_addresses,
    )


def test_loopback_only_means_every_address_is_loopback() -> None:
    assert is_loopback_only(["127.0.0.1"]) and is_loopback_only(["127.0.0.2", "::1"])
    assert not is_loopback_only([]) and not is_loopback_only(["127.0.0.1", "10.0.0.2"])


def test_offer_keeps_only_loopback_candidates() -> None:
    kept = drop_non_loopback_candidates(OFFER)
    assert [line.split()[4] for line in kept.split("\r\n") if line.startswith("a=candidate:")] == [
        "127.0.0.1",
        "::1",
    ]
    assert "a=end-of-candidates" in kept and kept.endswith("\r\n")


def test_trickled_candidates_off_loopback_are_refused() -> None:
    assert is_loopback_candidate("candidate:1 1 udp 2113937151 127.0.0.1 50000 typ host")
    assert not is_loopback_candidate("candidate:2 1 udp 2113937151 192.168.1.20 50001 typ host")
    assert not is_loopback_candidate("candidate:3 1 udp 2113937151 abc.local 50002 typ host")
    assert not is_loopback_candidate("garbage")


def test_ice_servers_off_loopback_are_dropped_only_when_restricted_to_loopback() -> None:
    servers = [
        protocol.IceServer(urls=["turn:127.0.0.1:3478?transport=udp"], username="u", credential="c"),
        protocol.IceServer(urls=["stun:[::1]:3478", "stun:localhost:3478"]),
        protocol.IceServer(urls=["turn:turn.example.com:3478"], username="u", credential="c"),
        protocol.IceServer(urls=["stun:127.0.0.1:3478", "stun:198.51.100.1:3478"]),
    ]
    restricted = Streamer(options(["127.0.0.1"], servers))
    assert restricted.loopback_only
    assert restricted.ice_servers == servers[:2]
    everywhere = Streamer(options([], servers))
    assert not everywhere.loopback_only and everywhere.ice_servers == servers


def test_host_addresses_must_be_ip_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--display", ":1", "--socket", "/nonexistent/s.sock"]
    assert parse_args([*base, "--host-addresses", "127.0.0.1, ::1"]).host_addresses == ["127.0.0.1", "::1"]
    with pytest.raises(SystemExit):
        parse_args([*base, "--host-addresses", "localhost"])
    assert "is not an IP address" in capsys.readouterr().err
