"""Stream benchmark: glass-to-glass latency, click-to-pixel, frames shown, sender CPU, bitrate and time to
first frame, for the WebRTC streamer and for the noVNC path (x11vnc behind a websocket).

A kiosk Chromium on Xvfb shows one of two pages, both with two timestamp strips (the wall-clock
millisecond, 24 bits as black/white blocks):

* ``animated``: a canvas redrawn on every animation frame (every pixel changes), strip A carries the
  paint time of each frame: the worst case for the encoder.
* ``static`` (``--static``): a sign-in form that does not move; strip A is repainted once a second (a
  clock, a blinking caret), so most captured frames are identical: what real browsing mostly looks like.

On both, strip B is repainted on every ``mousedown``: the benchmark clicks once a second (through the
WebRTC data channel, or an RFB PointerEvent) and times the click until a frame shows the new strip B
(click to pixel). Glass-to-glass is the time from painting strip A until a decoded frame first shows
that value (paint-to-decode, same clock, same machine; a browser receiver adds its jitter buffer and
compositing, about 10-20 ms, research/streaming.md).

* WebRTC cases: the streamer process (exactly as the agent starts it) sends to a Python aiortc receiver
  in this process.
* ``vnc`` cases: x11vnc exactly as the guest starts it (``browservm.guest.vnc``), a websocket relay
  standing in for the controller's VNC bridge, and a Python RFB client over the websocket asking for
  what noVNC asks for (Tight with JPEG quality 6, compression 2, CopyRect, cursor pseudo-encoding) and,
  like noVNC, requesting the next incremental update as soon as one is read. Sender CPU is x11vnc's.

    .venv/bin/python bench/stream.py [--seconds 8] [--only h264-720p30,vnc-720p,...] [--static]

Everything runs on loopback; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aioice.ice
import av
import psutil
import websockets.asyncio.client
import websockets.asyncio.server
from aiortc import RTCPeerConnection, RTCSessionDescription

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from browservm import protocol
from browservm.guest.vnc import free_loopback_port, read_banner
from tests.guest.desktop_testbed import Chromium, Xvfb
from tests.guest.test_streamer import Channel

BLOCK = 16
BITS = 24
CHECK_BITS = 8
"""After the 24 value bits, an 8-bit check: a strip read half old and half new (a torn read) is refused."""
STRIP_A_ROW = BLOCK  # centre row of strip A's blocks (painted from y = BLOCK/2)
STRIP_B_ROW = 3 * BLOCK  # centre row of strip B's blocks (painted from y = 5*BLOCK/2)
CLICK_AT = (900, 500)  # on neither strip, on no control: a click changes strip B only
CLICK_INTERVAL_S = 1.0

Page = Literal["animated", "static"]

STRIPS_JS = """
const BITS = 24, CHECK_BITS = 8, BLOCK = 16;
let clickStamp = 0;
const check = (ms) => (((ms >> 16) & 255) + ((ms >> 8) & 255) + (ms & 255)) & 255 ^ 0x5a;
function strip(ms, top) {  // 24 bits of the millisecond clock then 8 check bits, MSB first, 16x16 blocks
  const word = ms * 256 + check(ms), n = BITS + CHECK_BITS;
  g.fillStyle = '#000'; g.fillRect(0, top - BLOCK / 2, (n + 2) * BLOCK, BLOCK * 2);
  for (let b = 0; b < n; b++) {
    g.fillStyle = Math.floor(word / 2 ** (n - 1 - b)) % 2 ? '#fff' : '#000';
    g.fillRect((b + 1) * BLOCK, top, BLOCK, BLOCK);
  }
}
const stampNow = () => Math.floor(performance.timeOrigin + performance.now()) % (1 << BITS);
addEventListener('mousedown', () => { clickStamp = stampNow(); strip(clickStamp, BLOCK * 5 / 2); });
window.getState = () => "{}";
"""

ANIMATED_PAGE = f"""<!doctype html><html><head><meta charset="utf-8"><style>
html,body{{margin:0;overflow:hidden;background:#000}} canvas{{display:block}}
</style></head><body><canvas id="c"></canvas><script>
const c = document.getElementById('c'), g = c.getContext('2d');
c.width = innerWidth; c.height = innerHeight;
{STRIPS_JS}
function draw() {{
  const t = (performance.timeOrigin + performance.now()) / 1000;
  // an animated page: a moving gradient and bouncing boxes over the whole screen
  const grad = g.createLinearGradient(0, 0, c.width, c.height);
  grad.addColorStop(0, `hsl(${{(t * 40) % 360}},60%,30%)`);
  grad.addColorStop(1, `hsl(${{(t * 40 + 180) % 360}},60%,30%)`);
  g.fillStyle = grad; g.fillRect(0, 0, c.width, c.height);
  for (let i = 0; i < 8; i++) {{
    g.fillStyle = `hsl(${{i * 45}},80%,60%)`;
    const x = (Math.sin(t * (1 + i / 5) + i) * 0.45 + 0.5) * (c.width - 120);
    const y = (Math.cos(t * (1.3 + i / 7) + i) * 0.4 + 0.5) * (c.height - 120);
    g.fillRect(x, y, 120, 120);
  }}
  strip(stampNow(), BLOCK / 2);
  strip(clickStamp, BLOCK * 5 / 2);
  requestAnimationFrame(draw);
}}
requestAnimationFrame(draw);
</script></body></html>
"""

STATIC_PAGE = f"""<!doctype html><html><head><meta charset="utf-8"><style>
html,body{{margin:0;overflow:hidden;background:#f3f4f6;font:18px sans-serif;color:#111}}
canvas{{position:absolute;left:0;top:0}}
form{{position:absolute;left:420px;top:140px;width:420px;padding:32px;background:#fff;border-radius:8px;
  box-shadow:0 2px 12px #0002}}
input{{display:block;width:100%;box-sizing:border-box;margin:8px 0 20px;padding:10px;font-size:18px}}
button{{padding:10px 24px;font-size:18px;background:#2563eb;color:#fff;border:0;border-radius:6px}}
</style></head><body><canvas id="c" width="560" height="80"></canvas>
<form onsubmit="return false"><h2>Sign in to continue</h2>
<label>Email<input value="user@example.com"></label><label>Password<input type="password" value="hunter22">
</label><button>Sign in</button><p>By signing in you accept the terms of service and the privacy notice
of this example provider. This text is here so the page has the detail a real sign-in page has.</p></form>
<script>
const c = document.getElementById('c'), g = c.getContext('2d');
{STRIPS_JS}
strip(0, BLOCK * 5 / 2);
// strip A changes once a second, like a clock or a blinking caret: the rest of the time nothing moves
setInterval(() => strip(stampNow(), BLOCK / 2), 1000);
strip(stampNow(), BLOCK / 2);
</script></body></html>
"""


def strip_points(row: int) -> list[tuple[int, int]]:
    """The (x, y) block centres of the strip whose blocks are centred on ``row``."""
    return [((bit + 1) * BLOCK + BLOCK // 2, row) for bit in range(BITS + CHECK_BITS)]


def decode_strip(lumas: list[int | None]) -> int | None:
    """The millisecond value from the 32 block lumas, or ``None`` when a block is unknown or mid-grey or
    the check bits do not match."""
    word = 0
    for luma in lumas:
        if luma is None or 60 < luma < 190:
            return None  # a block caught mid-transition (or never seen): not a readable stamp
        word = (word << 1) | (luma >= 128)
    value = word >> CHECK_BITS
    check = (((value >> 16) & 255) + ((value >> 8) & 255) + (value & 255)) & 255 ^ 0x5A
    return value if word & 0xFF == check else None


def read_strip(frame: Any, row: int) -> int | None:
    """The millisecond value painted into a decoded video frame, read from the Y plane's block centres."""
    plane = frame.planes[0]
    stride = plane.line_size
    data = memoryview(plane)
    return decode_strip([data[y * stride + x] for x, y in strip_points(row)])


def wall_ms() -> int:
    return int(time.time() * 1000) % (1 << BITS)


def age_ms(stamp: int, now: int) -> int:
    return (now - stamp) % (1 << BITS)


@dataclass
class Tally:
    """What a receiver saw: every frame, each painted stamp's first appearance, each click's first pixel."""

    frames: int = 0
    latencies: list[float] = field(default_factory=list)
    seen_a: set[int] = field(default_factory=set)
    seen_b: set[int] = field(default_factory=set)
    clicks_sent: list[float] = field(default_factory=list)
    click_to_pixel: list[float] = field(default_factory=list)
    warm_a: set[int] = field(default_factory=set)
    measuring: bool = False
    """False during the warm-up: stamps are only remembered, so that one shown since then (the static
    page's last clock tick) does not count as first seen when the measurement starts."""

    def start(self) -> None:
        self.measuring = True
        self.frames = 0
        self.warm_a, self.seen_a = self.seen_a, set()

    def frame(self, stamp_a: int | None, stamp_b: int | None) -> None:
        now = wall_ms()
        self.frames += 1
        if stamp_a is not None and stamp_a not in self.seen_a and stamp_a not in self.warm_a:
            self.seen_a.add(stamp_a)
            if self.measuring and age_ms(stamp_a, now) < 5000:
                self.latencies.append(age_ms(stamp_a, now))
        if stamp_b is not None and stamp_b not in self.seen_b:
            self.seen_b.add(stamp_b)
            arrived = time.monotonic()
            # the latest click sent before this strip was painted (a stamp is at most 5 s old)
            sent = [t for t in self.clicks_sent if t <= arrived - age_ms(stamp_b, now) / 1000 + 0.005]
            if sent and self.frames > 1 and age_ms(stamp_b, now) < 5000:
                self.click_to_pixel.append((arrived - sent[-1]) * 1000)


@dataclass
class Result:
    name: str
    capture: str
    fps_received: float
    fps_shown: float
    g2g_median: float
    g2g_p95: float
    click_median: float
    clicks: str
    sender_cpu: float
    chromium_cpu: float
    kbps: float
    ttff_ms: float


def median_result(runs: list[Result]) -> Result:
    """Each figure's median over repeated runs (the click count is the first run's)."""
    if len(runs) == 1:
        return runs[0]
    figures = {
        name: statistics.median(getattr(r, name) for r in runs)
        for name, kind in Result.__annotations__.items()
        if kind == "float"
    }
    return Result(name=runs[0].name, capture=runs[0].capture, clicks=runs[0].clicks, **figures)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * share + 0.5) - 1)]


class CpuMeter:
    """CPU % of one core used by a process (and, with ``tree``, its children) between start and read."""

    def __init__(self, pid: int, tree: bool = False) -> None:
        root = psutil.Process(pid)
        self.procs = [root, *root.children(recursive=True)] if tree else [root]
        for p in self.procs:
            p.cpu_percent()

    def read(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.cpu_percent()
        return total


async def clicker(tally: Tally, click: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    """Click once a second; the first click comes half an interval in, off strip A's 1 Hz clock phase."""
    await asyncio.sleep(CLICK_INTERVAL_S / 2)
    while not stop.is_set():
        tally.clicks_sent.append(time.monotonic())
        await click()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CLICK_INTERVAL_S)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- WebRTC


async def run_webrtc_case(
    name: str, page: Page, codec: str, width: int, height: int, fps: int, seconds: float, capture: str
) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    page_path = workdir / "page.html"
    page_path.write_text(ANIMATED_PAGE if page == "animated" else STATIC_PAGE)
    xvfb = Xvfb(width, height)
    chromium = Chromium(xvfb.display, page_path.as_uri(), width, height)
    streamer = None
    pc = RTCPeerConnection()
    chan = None
    try:
        await chromium.connect()
        socket = workdir / "streamer.sock"
        streamer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "browservm.guest.streamer",
                "--display",
                xvfb.display,
                "--socket",
                str(socket),
                "--width",
                str(width),
                "--height",
                str(height),
                "--fps",
                str(fps),
                "--codec",
                codec,
                "--min-kbps",
                "500",
                "--max-kbps",
                "8000",
                "--ice-servers",
                "[]",
                "--host-addresses",
                "127.0.0.1",
                "--capture",
                capture,
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        while chan is None:  # the socket file appears at bind, a moment before the streamer listens
            if streamer.poll() is not None:
                raise RuntimeError("streamer exited")
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                chan = await Channel.open(socket)
            await asyncio.sleep(0.02)
        await chan.wait_ready()

        pc.addTransceiver("video", direction="recvonly")
        channel = pc.createDataChannel("input")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        got_track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_track(track: Any) -> None:
            if not got_track.done():
                got_track.set_result(track)

        pc.on("track", on_track)
        await pc.setLocalDescription(await pc.createOffer())
        offered = time.monotonic()
        answer = await chan.request(
            protocol.Signal(peer_id="bench", kind="offer", sdp=pc.localDescription.sdp)
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        track = await asyncio.wait_for(got_track, 10)
        await asyncio.wait_for(track.recv(), 10)
        ttff = (time.monotonic() - offered) * 1000
        await asyncio.wait_for(opened.wait(), 10)

        # warm-up: let the receiver's bitrate estimate settle
        tally = Tally()
        warm_until = time.monotonic() + 2
        while time.monotonic() < warm_until:
            frame = await asyncio.wait_for(track.recv(), 5)
            tally.frame(read_strip(frame, STRIP_A_ROW), read_strip(frame, STRIP_B_ROW))

        async def click() -> None:
            x, y = CLICK_AT
            channel.send(json.dumps({"t": "down", "button": 1, "x": x, "y": y}))
            channel.send(json.dumps({"t": "up", "button": 1, "x": x, "y": y}))

        sender = CpuMeter(streamer.pid)
        browser = CpuMeter(chromium.proc.pid, tree=True)
        receiver_cpu = CpuMeter(os.getpid())
        before = await chan.request(protocol.StreamStatus())
        tally.start()
        stop = asyncio.Event()
        clicks = asyncio.create_task(clicker(tally, click, stop))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            with contextlib.suppress(TimeoutError):
                frame = await asyncio.wait_for(track.recv(), started + seconds - time.monotonic() + 0.01)
                tally.frame(read_strip(frame, STRIP_A_ROW), read_strip(frame, STRIP_B_ROW))
        elapsed = time.monotonic() - started
        stop.set()
        await clicks
        sender_cpu, chromium_cpu = sender.read(), browser.read()
        status = await chan.request(protocol.StreamStatus())
        kbps = (status.bytes - before.bytes) * 8 / elapsed / 1000
        fps_sent = (status.frames - before.frames) / elapsed
        print(
            f"  {name}: encoded {fps_sent:.1f} fps, receiver process CPU {receiver_cpu.read():.0f} %",
            file=sys.stderr,
        )
        return summarize(name, str(status.capture), tally, elapsed, sender_cpu, chromium_cpu, kbps, ttff)
    finally:
        await pc.close()
        if chan is not None:
            await chan.close()
        if streamer is not None:
            stop_process(streamer)
        await chromium.stop()
        xvfb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(
    name: str,
    capture: str,
    tally: Tally,
    elapsed: float,
    sender_cpu: float,
    chromium_cpu: float,
    kbps: float,
    ttff: float,
) -> Result:
    if len(tally.latencies) <= 30:  # a sparse page: show every sample, so one late stamp is explained
        print(f"  {name}: g2g samples {sorted(round(v) for v in tally.latencies)}", file=sys.stderr)
    return Result(
        name=name,
        capture=capture,
        fps_received=tally.frames / elapsed,
        fps_shown=len(tally.seen_a) / elapsed,
        g2g_median=statistics.median(tally.latencies) if tally.latencies else float("nan"),
        g2g_p95=percentile(tally.latencies, 0.95),
        click_median=statistics.median(tally.click_to_pixel) if tally.click_to_pixel else float("nan"),
        clicks=f"{len(tally.click_to_pixel)}/{len(tally.clicks_sent)}",
        sender_cpu=sender_cpu,
        chromium_cpu=chromium_cpu,
        kbps=kbps,
        ttff_ms=ttff,
    )


# ---------------------------------------------------------------------------------------------- VNC


class WebSocketBytes:
    """A byte stream over a websocket's binary messages (what noVNC's Websock does)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.buffer = bytearray()
        self.received = 0

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await self.ws.recv()
            self.received += len(message)
            self.buffer += message
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def u8(self) -> int:
        return (await self.read(1))[0]

    async def compact_length(self) -> int:
        """Tight's 1-3 byte length, 7 bits a byte, least significant first."""
        length = 0
        for shift in (0, 7, 14):
            byte = await self.u8()
            length |= (byte & (0x7F if shift < 14 else 0xFF)) << shift
            if byte & 0x80 == 0 or shift == 14:
                break
        return length


X11VNC_ARGS = ["x11vnc", "-display", "-localhost", "-nopw", "-forever", "-shared", "-noncache", "-quiet"]
"""As :class:`browservm.guest.vnc.VncService` starts it (the display and the port go in between)."""
ENCODING_RAW, ENCODING_COPYRECT, ENCODING_TIGHT = 0, 1, 7
PSEUDO_CURSOR, PSEUDO_DESKTOP_SIZE, PSEUDO_LAST_RECT = -239, -223, -224
NOVNC_QUALITY, NOVNC_COMPRESSION = 6, 2
"""noVNC's defaults (``qualityLevel``, ``compressionLevel``)."""


class RfbClient:
    """A minimal RFB 3.8 client that tracks the pixels of the two timestamp strips only.

    Every rectangle is parsed (and every zlib stream inflated, so the streams stay in step), but pixels
    are decoded only for rectangles that cover a strip block centre.
    """

    def __init__(self, stream: WebSocketBytes, ws: Any) -> None:
        self.stream, self.ws = stream, ws
        self.points = {p: None for p in strip_points(STRIP_A_ROW) + strip_points(STRIP_B_ROW)}
        self.lumas: dict[tuple[int, int], int | None] = dict(self.points)
        self.zlib = [zlib.decompressobj() for _ in range(4)]
        self.jpeg = av.CodecContext.create("mjpeg", "r")
        self.width = self.height = 0

    async def handshake(self) -> None:
        s = self.stream
        version = await s.read(12)
        if not version.startswith(b"RFB 003.00"):
            raise RuntimeError(f"not an RFB server: {version!r}")
        await self.ws.send(b"RFB 003.008\n")
        types = await s.read(await s.u8())
        if 1 not in types:
            raise RuntimeError(f"x11vnc offers no 'None' security type: {list(types)}")
        await self.ws.send(b"\x01")
        if struct.unpack(">I", await s.read(4))[0] != 0:
            raise RuntimeError("RFB security handshake failed")
        await self.ws.send(b"\x01")  # ClientInit, shared
        self.width, self.height = struct.unpack(">HH", await s.read(4))
        await s.read(16)
        await s.read(struct.unpack(">I", await s.read(4))[0])
        # 32 bpp, depth 24, little endian, true colour, 8 bits a channel: R<<16 | G<<8 | B
        pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        await self.ws.send(b"\x00\x00\x00\x00" + pixel_format)
        encodings = [
            ENCODING_COPYRECT,
            ENCODING_TIGHT,
            ENCODING_RAW,
            -32 + NOVNC_QUALITY,
            -256 + NOVNC_COMPRESSION,
            PSEUDO_DESKTOP_SIZE,
            PSEUDO_LAST_RECT,
            PSEUDO_CURSOR,
        ]
        await self.ws.send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    async def request(self, incremental: bool) -> None:
        await self.ws.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    async def click(self, x: int, y: int) -> None:
        await self.ws.send(struct.pack(">BBHH", 5, 1, x, y))
        await self.ws.send(struct.pack(">BBHH", 5, 0, x, y))

    async def next_update(self) -> None:
        """Read server messages until one framebuffer update has been applied."""
        s = self.stream
        while True:
            kind = await s.u8()
            if kind == 0:
                break
            if kind == 1:  # colour map entries (not used with true colour)
                _, _, count = struct.unpack(">BHH", await s.read(5))
                await s.read(6 * count)
            elif kind == 2:  # bell
                continue
            elif kind == 3:  # server cut text
                await s.read(3)
                await s.read(struct.unpack(">I", await s.read(4))[0])
            else:
                raise RuntimeError(f"unexpected RFB server message type {kind}")
        _, count = struct.unpack(">BH", await s.read(3))
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await s.read(12))
            if encoding == PSEUDO_LAST_RECT:
                break
            if encoding == ENCODING_TIGHT:
                await self._tight(x, y, w, h)
            elif encoding == ENCODING_COPYRECT:
                sx, sy = struct.unpack(">HH", await s.read(4))
                moved = {p: self.lumas.get((sx + p[0] - x, sy + p[1] - y)) for p in self._covered(x, y, w, h)}
                self.lumas.update(moved)
            elif encoding == ENCODING_RAW:
                data = await s.read(w * h * 4)
                for px, py in self._covered(x, y, w, h):
                    i = ((py - y) * w + (px - x)) * 4
                    self.lumas[(px, py)] = luma(data[i + 2], data[i + 1], data[i])
            elif encoding == PSEUDO_CURSOR:
                await s.read(w * h * 4 + (w + 7) // 8 * h)
            elif encoding == PSEUDO_DESKTOP_SIZE:
                self.width, self.height = w, h
            else:
                raise RuntimeError(f"unexpected RFB encoding {encoding}")

    def stamps(self) -> tuple[int | None, int | None]:
        return (
            decode_strip([self.lumas[p] for p in strip_points(STRIP_A_ROW)]),
            decode_strip([self.lumas[p] for p in strip_points(STRIP_B_ROW)]),
        )

    def _covered(self, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
        return [(px, py) for px, py in self.points if x <= px < x + w and y <= py < y + h]

    async def _tight(self, x: int, y: int, w: int, h: int) -> None:
        s = self.stream
        control = await s.u8()
        for stream in range(4):
            if control & (1 << stream):
                self.zlib[stream] = zlib.decompressobj()
        kind = control >> 4
        covered = self._covered(x, y, w, h)
        if kind == 0x08:  # fill
            r, g, b = await s.read(3)
            for p in covered:
                self.lumas[p] = luma(r, g, b)
            return
        if kind == 0x09:  # JPEG
            data = await s.read(await s.compact_length())
            if covered:
                for frame in self.jpeg.decode(av.Packet(data)):
                    gray = frame.reformat(format="gray")
                    plane = gray.planes[0]
                    pixels = bytes(plane)
                    for px, py in covered:
                        self.lumas[(px, py)] = pixels[(py - y) * plane.line_size + (px - x)]
            return
        if kind & 0x08:
            raise RuntimeError(f"unexpected Tight compression control {control:#x}")
        stream = kind & 0x03
        filter_id = await s.u8() if kind & 0x04 else 0
        palette: list[tuple[int, int, int]] = []
        if filter_id == 1:
            colours = await s.u8() + 1
            raw = await s.read(3 * colours)
            palette = [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
            size = (w + 7) // 8 * h if colours == 2 else w * h
        elif filter_id in (0, 2):
            size = w * h * 3
        else:
            raise RuntimeError(f"unexpected Tight filter {filter_id}")
        if size < 12:
            data = await s.read(size)
        else:
            data = self.zlib[stream].decompress(await s.read(await s.compact_length()))
        for px, py in covered:
            cx, cy = px - x, py - y
            if filter_id == 1 and len(palette) == 2:
                bit = data[cy * ((w + 7) // 8) + cx // 8] >> (7 - cx % 8) & 1
                self.lumas[(px, py)] = luma(*palette[bit])
            elif filter_id == 1:
                self.lumas[(px, py)] = luma(*palette[data[cy * w + cx]])
            elif filter_id == 0:
                i = (cy * w + cx) * 3
                self.lumas[(px, py)] = luma(data[i], data[i + 1], data[i + 2])
            else:
                self.lumas[(px, py)] = luma(*gradient_pixel(data, w, cx, cy))


def gradient_pixel(data: bytes, w: int, cx: int, cy: int) -> tuple[int, int, int]:
    """One pixel of a Tight gradient-filtered rectangle (predictor left + above - above-left, clamped)."""
    rows: list[list[tuple[int, int, int]]] = []
    for row in range(cy + 1):
        out: list[tuple[int, int, int]] = []
        for col in range(w):
            i = (row * w + col) * 3
            pixel = []
            for ch in range(3):
                left = out[col - 1][ch] if col else 0
                above = rows[row - 1][col][ch] if row else 0
                corner = rows[row - 1][col - 1][ch] if row and col else 0
                predicted = min(255, max(0, left + above - corner))
                pixel.append((predicted + data[i + ch]) & 0xFF)
            out.append((pixel[0], pixel[1], pixel[2]))
        rows.append(out)
    return rows[cy][cx]


def luma(r: int, g: int, b: int) -> int:
    return (299 * r + 587 * g + 114 * b) // 1000


async def run_vnc_case(name: str, page: Page, width: int, height: int, seconds: float) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    page_path = workdir / "page.html"
    page_path.write_text(ANIMATED_PAGE if page == "animated" else STATIC_PAGE)
    xvfb = Xvfb(width, height)
    chromium = Chromium(xvfb.display, page_path.as_uri(), width, height)
    x11vnc = None
    relay = None
    try:
        await chromium.connect()
        port = free_loopback_port()
        x11vnc = subprocess.Popen(
            [*X11VNC_ARGS[:2], xvfb.display, "-rfbport", str(port), *X11VNC_ARGS[2:]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                if (await read_banner(port)).startswith(b"RFB"):
                    break
            if x11vnc.poll() is not None:
                raise RuntimeError(f"x11vnc exited with {x11vnc.returncode}")
            await asyncio.sleep(0.05)

        async def bridge(ws: Any) -> None:  # stands in for the controller's VNC websocket bridge
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def upstream() -> None:
                async for message in ws:
                    writer.write(message)

            pump = asyncio.create_task(upstream())
            try:
                while chunk := await reader.read(64 * 1024):
                    await ws.send(chunk)
            finally:
                pump.cancel()
                writer.close()

        relay = await websockets.asyncio.server.serve(
            bridge, "127.0.0.1", 0, subprotocols=[websockets.Subprotocol("binary")], max_size=None
        )
        relay_port = next(iter(relay.sockets)).getsockname()[1]
        started_connect = time.monotonic()
        async with websockets.asyncio.client.connect(
            f"ws://127.0.0.1:{relay_port}/",
            subprotocols=[websockets.Subprotocol("binary")],
            max_size=None,
            compression=None,
        ) as ws:
            stream = WebSocketBytes(ws)
            client = RfbClient(stream, ws)
            await client.handshake()
            await client.request(incremental=False)
            await client.next_update()
            ttff = (time.monotonic() - started_connect) * 1000
            tally = Tally()
            warm_until = time.monotonic() + 2
            while time.monotonic() < warm_until:
                await client.request(incremental=True)
                await asyncio.wait_for(client.next_update(), 5)  # strip A changes every second
                tally.frame(*client.stamps())

            sender = CpuMeter(x11vnc.pid)
            browser = CpuMeter(chromium.proc.pid, tree=True)
            tally.start()
            stop = asyncio.Event()
            clicks = asyncio.create_task(clicker(tally, lambda: client.click(*CLICK_AT), stop))
            bytes_before = stream.received
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                await client.request(incremental=True)
                await asyncio.wait_for(client.next_update(), 5)  # a cancelled read would desync the stream
                tally.frame(*client.stamps())
            elapsed = time.monotonic() - started
            stop.set()
            await clicks
            sender_cpu, chromium_cpu = sender.read(), browser.read()
            kbps = (stream.received - bytes_before) * 8 / elapsed / 1000
        return summarize(name, "x11vnc", tally, elapsed, sender_cpu, chromium_cpu, kbps, ttff)
    finally:
        if relay is not None:
            relay.close()
        if x11vnc is not None:
            stop_process(x11vnc)
        await chromium.stop()
        xvfb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- main

CASES: dict[str, tuple[str, int, int, int, str]] = {
    "h264-720p30": ("h264", 1280, 720, 30, "auto"),
    "vp8-720p30": ("vp8", 1280, 720, 30, "auto"),
    "h264-720p60": ("h264", 1280, 720, 60, "auto"),
    "h264-1080p30": ("h264", 1920, 1080, 30, "auto"),
    "vp8-1080p30": ("vp8", 1920, 1080, 30, "auto"),
    "h264-720p30-x11grab": ("h264", 1280, 720, 30, "x11grab"),
    "vp8-720p30-x11grab": ("vp8", 1280, 720, 30, "x11grab"),
    "vnc-720p": ("vnc", 1280, 720, 0, "x11vnc"),
}


def use_fast_vp8_decoder() -> None:
    """aiortc's receiver decodes VP8 with libvpx on one thread, which cannot keep up with a full-screen
    animation at 720p30 on this box (frames queue up, latency grows by seconds); FFmpeg's own vp8
    decoder on two threads does. This concerns the Python receiver only; browsers decode VP8 natively."""
    from aiortc.codecs import vpx

    def init(self: Any) -> None:
        self.codec = av.CodecContext.create("vp8", "r")
        self.codec.thread_count = 2

    vpx.Vp8Decoder.__init__ = init  # type: ignore[method-assign]


def use_marker_bit_jitter_buffer() -> None:
    """aiortc's receiver hands a video frame to the decoder only when the first packet of the *next*
    frame arrives, which adds one frame interval (33 ms at 30 fps) that a browser, which completes a
    frame on its RTP marker bit, does not add. Complete frames on the marker bit here too, so the
    figures measure the streamer rather than aiortc's receiver."""
    from aiortc import jitterbuffer

    def remove_frame(self: Any, sequence_number: int) -> Any:
        packets: list[Any] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None
            if packets and packet.timestamp != packets[0].timestamp:
                self.remove(count)
                return jitterbuffer.JitterFrame(b"".join(p._data for p in packets), packets[0].timestamp)
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return jitterbuffer.JitterFrame(b"".join(p._data for p in packets), packets[0].timestamp)
        return None

    jitterbuffer.JitterBuffer._remove_frame = remove_frame  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument(
        "--static", action="store_true", help="also run every case on the mostly-static sign-in page"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each case N times and report the median of each figure"
    )
    args = parser.parse_args()
    # loopback-only: aioice skips 127.0.0.1 unless told to use it
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    use_fast_vp8_decoder()
    use_marker_bit_jitter_buffer()
    pages: list[Page] = ["animated", "static"] if args.static else ["animated"]
    results = []
    for name in args.only.split(","):
        codec, width, height, fps, capture = CASES[name]
        for page in pages:
            label = f"{name} {page}"
            runs = []
            for _ in range(args.repeat):
                print(f"running {label} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
                if codec == "vnc":
                    runs.append(await run_vnc_case(label, page, width, height, args.seconds))
                else:
                    runs.append(
                        await run_webrtc_case(label, page, codec, width, height, fps, args.seconds, capture)
                    )
            results.append(median_result(runs))
    print()
    print(
        f"{os.cpu_count()} cores; sender CPU is % of one core (streamer process, or x11vnc); Python "
        f"receivers; {args.seconds:.0f} s per case, median of {args.repeat}; load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )
    header = (
        "| case | capture | fps recv | fps shown | g2g median ms | g2g p95 ms | click→pixel ms (n) "
        "| sender CPU % | page Chromium CPU % | kbit/s | TTFF ms |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in results:
        print(
            f"| {r.name} | {r.capture} | {r.fps_received:.1f} | {r.fps_shown:.1f} | {r.g2g_median:.0f} "
            f"| {r.g2g_p95:.0f} | {r.click_median:.0f} ({r.clicks}) | {r.sender_cpu:.0f} "
            f"| {r.chromium_cpu:.0f} | {r.kbps:.0f} | {r.ttff_ms:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
