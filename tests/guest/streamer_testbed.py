"""The streamer as the agent runs it, and a Python aiortc viewer that signals through the streamer's
unix-socket protocol as the agent relays it: shared by the streamer and capture tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from aiortc import RTCPeerConnection, RTCSessionDescription
from pydantic import BaseModel

from browservm import protocol

WIDTH, HEIGHT = 1280, 720
ResultT = TypeVar("ResultT", bound=BaseModel)


class StreamerProcess:
    def __init__(
        self,
        display: str,
        directory: Path,
        codec: str = "h264",
        capture: str = "auto",
        refresh_s: float = 1.0,
        max_size: tuple[int, int] | None = None,
    ) -> None:
        self.socket = directory / f"streamer-{codec}-{capture}.sock"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "browservm.guest.streamer",
                "--display",
                display,
                "--socket",
                str(self.socket),
                "--width",
                str(WIDTH),
                "--height",
                str(HEIGHT),
                "--fps",
                "30",
                "--codec",
                codec,
                "--min-kbps",
                "300",
                "--max-kbps",
                "4000",
                "--ice-servers",
                "[]",
                "--host-addresses",
                "127.0.0.1",
                "--refresh-s",
                str(refresh_s),
                *(["--max-width", str(max_size[0]), "--max-height", str(max_size[1])] if max_size else []),
            ],
            env={**os.environ, "BROWSERVM_STREAMER_CAPTURE": capture},
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():  # the socket appears once the streamer accepts connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamer exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("streamer socket never appeared")
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Channel:
    """The agent's end of the streamer socket, as the agent holds it: a protocol peer, events queued."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.events: asyncio.Queue[BaseModel] = asyncio.Queue()
        self.peer = protocol.Peer(reader, writer, name="streamer", on_event=self.events.put_nowait)

    @classmethod
    async def open(cls, socket: Path) -> Channel:
        # The socket's file appears at bind(), a moment before listen(): refused until then, as the agent
        # finds it too (guest/streamer_link.py retries the same way).
        deadline = time.monotonic() + 10
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                return cls(reader, writer)

    async def request(self, message: protocol.Request[ResultT]) -> ResultT:
        return await self.peer.request(message, timeout_s=15)

    async def event(self, predicate: Any, timeout: float = 10) -> BaseModel:
        async def wait() -> BaseModel:
            while True:
                message = await self.events.get()
                if predicate(message):
                    return message

        return await asyncio.wait_for(wait(), timeout)

    async def wait_ready(self) -> None:
        await self.event(lambda m: isinstance(m, protocol.ServiceState) and m.state == "ready", 20)

    async def close(self) -> None:
        await self.peer.close()


class ViewerPeer:
    """What the viewer page does: offer recvonly video plus an ``input`` data channel."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.input = self.pc.createDataChannel("input")
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.opened = asyncio.Event()
        self.track: Any = None
        self.got_track = asyncio.Event()
        self.answer = ""
        """The streamer's answer SDP, once connected."""
        self.input.on("open", self.opened.set)
        self.input.on("message", lambda raw: self.messages.put_nowait(json.loads(raw)))

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self.track = track
            self.got_track.set()

    async def connect(
        self, channel: Channel, peer_id: str = "viewer-1", media: protocol.MediaMapping | None = None
    ) -> float:
        """Signal through the channel; returns seconds from sending the offer to the first decoded frame.
        ``media``: the sandbox's public UDP mapping, as the agent adds it to the offer."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        started = time.monotonic()
        answer = await channel.request(
            protocol.Signal(peer_id=peer_id, kind="offer", sdp=self.pc.localDescription.sdp, media=media)
        )
        assert answer.sdp
        self.answer = answer.sdp
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        await asyncio.wait_for(self.got_track.wait(), 20)
        await self.frame()
        return time.monotonic() - started

    async def frame(self) -> Any:
        return await asyncio.wait_for(self.track.recv(), 20)

    async def send(self, message: dict[str, Any]) -> None:
        await asyncio.wait_for(self.opened.wait(), 10)
        self.input.send(json.dumps(message))

    async def close(self) -> None:
        await self.pc.close()


def brightness_at(frame: Any, x: int, y: int) -> int:
    """Mean luma of a 10x10 block around x,y (no numpy in the venv: read the Y plane directly)."""
    gray = frame.reformat(format="gray")
    plane = gray.planes[0]
    data, stride = bytes(plane), plane.line_size
    values = [data[row * stride + col] for row in range(y - 5, y + 5) for col in range(x - 5, x + 5)]
    return sum(values) // len(values)
