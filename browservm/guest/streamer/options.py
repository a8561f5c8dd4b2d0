"""The streamer's command line, as the agent's streamer service builds it."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from browservm import protocol
from browservm.guest.capture import REFRESH_S, CaptureConfig
from browservm.guest.screen_size import ScreenBounds

CaptureKind = Literal["auto", "pixelflux", "x11grab"]
MIN_WIDTH, MIN_HEIGHT = 320, 240
"""The smallest screen a viewer gets (a phone held upright is about 360 CSS pixels wide)."""


@dataclass(frozen=True)
class StreamerOptions:
    socket: Path
    """The unix socket the streamer serves the channel protocol on."""
    capture: CaptureConfig
    ice_servers: list[protocol.IceServer] = field(default_factory=list)
    host_addresses: list[str] = field(default_factory=list)
    capture_kind: CaptureKind = "auto"
    bounds: ScreenBounds | None = None
    """The sizes the screen may take to follow a viewer; ``None``: it keeps the capture's size."""


_ICE_SERVERS: TypeAdapter[list[protocol.IceServer]] = TypeAdapter(list[protocol.IceServer])


def parse_args(argv: list[str] | None = None) -> StreamerOptions:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.guest.streamer", description="The WebRTC streamer of one guest display."
    )
    parser.add_argument("--display", required=True, help="X display to stream, e.g. :99")
    parser.add_argument(
        "--socket", required=True, type=Path, help="unix socket to serve the channel protocol on"
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--max-width", type=int, default=0, help="the widest the screen follows a viewer to")
    parser.add_argument("--max-height", type=int, default=0)
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
    bounds = None
    if args.max_width or args.max_height:
        if args.max_width < args.width or args.max_height < args.height:
            parser.error("--max-width and --max-height must be at least --width and --height")
        bounds = ScreenBounds(MIN_WIDTH, MIN_HEIGHT, args.max_width, args.max_height)
    if not 0 < args.min_kbps <= args.max_kbps:
        parser.error("--min-kbps must be positive and not above --max-kbps")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return StreamerOptions(
        socket=args.socket,
        capture=CaptureConfig(
            display=args.display,
            width=args.width,
            height=args.height,
            fps=args.fps,
            codec=args.codec,
            min_kbps=args.min_kbps,
            max_kbps=args.max_kbps,
            refresh_s=args.refresh_s,
        ),
        ice_servers=ice_servers,
        host_addresses=host_addresses,
        capture_kind=args.capture,
        bounds=bounds,
    )
