"""The streamer as a supervised service of a browser sandbox (its process and its link)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from browservm import protocol
from browservm.guest.display import XvfbService
from browservm.guest.streamer_link import StreamerLink
from browservm.guest.supervisor import Service, ServiceLog, ServiceUnavailable, kill_group, spawn

STREAMER_CONNECT_S = 15.0


class StreamerService(Service):
    """``python -m browservm.guest.streamer``: ready once it reports a first encoded frame."""

    name = "streamer"
    requires = ("xvfb",)
    ready_timeout_s = 30.0

    def __init__(
        self,
        xvfb: XvfbService,
        socket_path: Path,
        screen: protocol.ScreenConfig,
        stream: protocol.StreamConfig,
        env: dict[str, str],
        emit: Callable[[BaseModel], None],
    ) -> None:
        self.xvfb = xvfb
        self.socket_path = socket_path
        self.screen = screen
        self.stream = stream
        self.env = env
        self.emit = emit
        self.link: StreamerLink | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        if importlib.util.find_spec("browservm.guest.streamer") is None:
            raise ServiceUnavailable(
                "browservm.guest.streamer is not in this guest image: WebRTC is off, viewers fall back to VNC"
            )
        assert self.xvfb.display is not None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # Servers with credentials (TURN) never go on a command line, where logs and /proc show them: the
        # agent hands the session's to the streamer with each offer it relays.
        ice = [s.model_dump(exclude_none=True) for s in self.stream.ice_servers if s.credential is None]
        argv = [
            sys.executable,
            "-m",
            "browservm.guest.streamer",
            "--display",
            self.xvfb.display,
            "--socket",
            str(self.socket_path),
            "--width",
            str(self.screen.width),
            "--height",
            str(self.screen.height),
            "--max-width",
            str(self.screen.largest[0]),
            "--max-height",
            str(self.screen.largest[1]),
            "--fps",
            str(self.screen.fps),
            "--codec",
            self.stream.codec,
            "--min-kbps",
            str(self.stream.min_bitrate_kbps),
            "--max-kbps",
            str(self.stream.max_bitrate_kbps),
            "--ice-servers",
            json.dumps(ice),
        ]
        if self.stream.host_addresses:
            argv += ["--host-addresses", ",".join(self.stream.host_addresses)]
        self._process = await spawn(argv, env={**self.env, "DISPLAY": self.xvfb.display}, log_to=log_to)
        return self._process

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        link = StreamerLink(self.emit, on_lost=lambda: kill_group(process.pid, signal.SIGTERM))
        # A streamer whose socket went quiet is of no use: ending it makes the supervisor restart it.
        await link.connect(self.socket_path, STREAMER_CONNECT_S)
        try:
            await link.ready.wait()
        except BaseException:
            await link.close()
            raise
        self.link = link

    async def exited(self) -> None:
        if self.link is not None:
            await self.link.close()
            self.link = None
