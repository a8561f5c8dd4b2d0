"""Stream benchmark: glass-to-glass latency, frames shown, sender CPU, bitrate and time to first frame.

A kiosk Chromium on Xvfb paints an animated canvas with a timestamp strip (the wall-clock millisecond,
24 bits as black/white blocks) on every animation frame. The streamer process (exactly as the agent starts
it) sends it over WebRTC to a Python aiortc receiver in this process, which reads the strip from every
decoded frame: latency = decode time - paint time (same clock, same machine). This is paint-to-decode; a
browser receiver adds its jitter buffer and compositing (about 10-20 ms, research/streaming.md).

    .venv/bin/python bench/stream.py [--seconds 8] [--only h264-720p30,...]

Everything runs on loopback; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioice.ice
import psutil
from aiortc import RTCPeerConnection, RTCSessionDescription

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from browservm import protocol
from tests.guest.desktop_testbed import Chromium, Xvfb
from tests.guest.test_streamer import Channel

BLOCK = 16
BITS = 24

PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
html,body{margin:0;overflow:hidden;background:#000} canvas{display:block}
</style></head><body><canvas id="c"></canvas><script>
const c = document.getElementById('c'), g = c.getContext('2d');
c.width = innerWidth; c.height = innerHeight;
function draw() {
  const now = performance.timeOrigin + performance.now();
  const t = now / 1000;
  // an animated page: a moving gradient and bouncing boxes over the whole screen
  const grad = g.createLinearGradient(0, 0, c.width, c.height);
  grad.addColorStop(0, `hsl(${(t * 40) % 360},60%,30%)`);
  grad.addColorStop(1, `hsl(${(t * 40 + 180) % 360},60%,30%)`);
  g.fillStyle = grad; g.fillRect(0, 0, c.width, c.height);
  for (let i = 0; i < 8; i++) {
    g.fillStyle = `hsl(${i * 45},80%,60%)`;
    const x = (Math.sin(t * (1 + i / 5) + i) * 0.45 + 0.5) * (c.width - 120);
    const y = (Math.cos(t * (1.3 + i / 7) + i) * 0.4 + 0.5) * (c.height - 120);
    g.fillRect(x, y, 120, 120);
  }
  // the timestamp strip: 24 bits of the millisecond clock, MSB first, 16x16 blocks on a black band
  const ms = Math.floor(now) % (1 << 24);
  g.fillStyle = '#000'; g.fillRect(0, 0, (BITS + 2) * BLOCK, BLOCK * 2);
  for (let b = 0; b < BITS; b++) {
    g.fillStyle = (ms >> (BITS - 1 - b)) & 1 ? '#fff' : '#000';
    g.fillRect((b + 1) * BLOCK, BLOCK / 2, BLOCK, BLOCK);
  }
  requestAnimationFrame(draw);
}
const BITS = 24, BLOCK = 16;
window.getState = () => "{}";
requestAnimationFrame(draw);
</script></body></html>
"""


def read_strip(frame: Any) -> int | None:
    """The millisecond value painted into the frame, read from the Y plane's block centres."""
    plane = frame.planes[0]
    stride = plane.line_size
    data = memoryview(plane)
    row = BLOCK  # centre of the blocks (y from BLOCK/2 to 3*BLOCK/2)
    value = 0
    for bit in range(BITS):
        x = (bit + 1) * BLOCK + BLOCK // 2
        luma = data[row * stride + x]
        if 60 < luma < 190:
            return None  # a block caught mid-transition: not a readable stamp
        value = (value << 1) | (luma >= 128)
    return value


@dataclass
class Result:
    name: str
    fps_received: float
    fps_shown: float
    g2g_median: float
    g2g_p95: float
    sender_cpu: float
    chromium_cpu: float
    kbps: float
    ttff_ms: float
    capture: str


async def run_case(
    name: str, codec: str, width: int, height: int, fps: int, seconds: float, capture: str
) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    page_path = workdir / "page.html"
    page_path.write_text(PAGE)
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
        while not socket.exists():
            if streamer.poll() is not None:
                raise RuntimeError("streamer exited")
            await asyncio.sleep(0.02)
        chan = await Channel.open(socket)
        await chan.wait_ready()

        pc.addTransceiver("video", direction="recvonly")
        pc.createDataChannel("input")
        got_track: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: got_track.done() or got_track.set_result(track))
        await pc.setLocalDescription(await pc.createOffer())
        offered = time.monotonic()
        reply = await chan.request(
            protocol.Signal, peer_id="bench", kind="offer", sdp=pc.localDescription.sdp
        )
        assert reply.ok, reply.error
        await pc.setRemoteDescription(RTCSessionDescription(**reply.result))
        track = await asyncio.wait_for(got_track, 10)
        await asyncio.wait_for(track.recv(), 10)
        ttff = (time.monotonic() - offered) * 1000

        # warm-up: let the receiver's bitrate estimate settle
        warm_until = time.monotonic() + 2
        while time.monotonic() < warm_until:
            await asyncio.wait_for(track.recv(), 5)

        sender = psutil.Process(streamer.pid)
        browser = psutil.Process(chromium.proc.pid)
        browser_tree = [browser, *browser.children(recursive=True)]
        sender.cpu_percent()
        for p in browser_tree:
            p.cpu_percent()
        before = (await chan.request(protocol.Status)).result
        bytes_before = before["bytes"]
        receiver_cpu = psutil.Process()
        receiver_cpu.cpu_percent()
        started = time.monotonic()
        latencies: list[float] = []
        stamps: set[int] = set()
        received = 0
        while time.monotonic() - started < seconds:
            frame = await asyncio.wait_for(track.recv(), 5)
            now_ms = int(time.time() * 1000) % (1 << BITS)
            received += 1
            stamp = read_strip(frame)
            if stamp is None:
                continue
            delay = (now_ms - stamp) % (1 << BITS)
            if delay < 5000:
                latencies.append(delay)
                stamps.add(stamp)
        elapsed = time.monotonic() - started
        sender_cpu = sender.cpu_percent()
        chromium_cpu = 0.0
        for p in browser_tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                chromium_cpu += p.cpu_percent()
        status = (await chan.request(protocol.Status)).result
        kbps = (status["bytes"] - bytes_before) * 8 / elapsed / 1000
        fps_sent = (status["frames"] - before["frames"]) / elapsed
        print(
            f"  {name}: encoded {fps_sent:.1f} fps, receiver process CPU {receiver_cpu.cpu_percent():.0f} %",
            file=sys.stderr,
        )
        latencies.sort()
        return Result(
            name=name,
            fps_received=received / elapsed,
            fps_shown=len(stamps) / elapsed,
            g2g_median=statistics.median(latencies) if latencies else float("nan"),
            g2g_p95=latencies[int(len(latencies) * 0.95) - 1] if latencies else float("nan"),
            sender_cpu=sender_cpu,
            chromium_cpu=chromium_cpu,
            kbps=kbps,
            ttff_ms=ttff,
            capture=str(status["capture"]),
        )
    finally:
        await pc.close()
        if chan is not None:
            await chan.close()
        if streamer is not None:
            streamer.terminate()
            try:
                streamer.wait(10)
            except subprocess.TimeoutExpired:
                streamer.kill()
                streamer.wait()
        await chromium.stop()
        xvfb.stop()
        shutil.rmtree(workdir, ignore_errors=True)


CASES = {
    "h264-720p30": ("h264", 1280, 720, 30, "auto"),
    "vp8-720p30": ("vp8", 1280, 720, 30, "auto"),
    "h264-720p60": ("h264", 1280, 720, 60, "auto"),
    "h264-1080p30": ("h264", 1920, 1080, 30, "auto"),
    "vp8-1080p30": ("vp8", 1920, 1080, 30, "auto"),
    "h264-720p30-x11grab": ("h264", 1280, 720, 30, "x11grab"),
    "vp8-720p30-x11grab": ("vp8", 1280, 720, 30, "x11grab"),
}


def use_fast_vp8_decoder() -> None:
    """aiortc's receiver decodes VP8 with libvpx on one thread, which cannot keep up with a full-screen
    animation at 720p30 on this box (frames queue up, latency grows by seconds); FFmpeg's own vp8
    decoder on two threads does. This concerns the Python receiver only; browsers decode VP8 natively."""
    import av
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
    args = parser.parse_args()
    # loopback-only: aioice skips 127.0.0.1 unless told to use it
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    use_fast_vp8_decoder()
    use_marker_bit_jitter_buffer()
    results = []
    for name in args.only.split(","):
        codec, width, height, fps, capture = CASES[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(await run_case(name, codec, width, height, fps, args.seconds, capture))
    print()
    print(
        f"{os.cpu_count()} cores; sender CPU is % of one core (streamer process); Python receiver; "
        f"{args.seconds:.0f} s per case"
    )
    header = (
        "| case | capture | fps recv | fps shown | g2g median ms | g2g p95 ms | sender CPU % "
        "| page Chromium CPU % | kbit/s | TTFF ms |"
    )
    print(header)
    print("|" + "---|" * 10)
    for r in results:
        print(
            f"| {r.name} | {r.capture} | {r.fps_received:.1f} | {r.fps_shown:.1f} | {r.g2g_median:.0f} "
            f"| {r.g2g_p95:.0f} | {r.sender_cpu:.0f} | {r.chromium_cpu:.0f} | {r.kbps:.0f} | {r.ttff_ms:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
