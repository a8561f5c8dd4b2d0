"""The fallback capture source: PyAV's ``x11grab`` and its libx264/libvpx encoders on a thread."""

from __future__ import annotations

import asyncio
import fractions
import logging
import threading
import time
from typing import Any

import av

from browservm.guest.capture.frame import EncodedFrame, is_keyframe
from browservm.guest.capture.source import IDLE_FPS, CaptureConfig, CaptureUnavailable, VideoSource

log = logging.getLogger(__name__)


class X11GrabSource(VideoSource):
    """PyAV ``x11grab`` + libx264/libvpx on one thread. Costlier than pixelflux: it encodes every frame."""

    name = "x11grab"

    def __init__(self, config: CaptureConfig) -> None:
        super().__init__(config)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._keyframe = threading.Event()
        self._active = threading.Event()
        self._error: str | None = None
        self._bitrate_changed = threading.Event()

    async def start(self) -> None:
        self._stopping.clear()  # started again after a stop (a resize)
        self._error = None
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="x11grab", daemon=True)
        self._thread.start()
        await opened

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def failure(self) -> str | None:
        return self._error

    def _force_keyframe(self) -> None:
        self._keyframe.set()

    def _apply_bitrate(self, kbps: int) -> None:
        self._bitrate_changed.set()

    def _apply_active(self, active: bool) -> None:
        if active:
            self._active.set()
        else:
            self._active.clear()

    def _encoder(self) -> Any:
        if self.config.codec == "h264":
            codec = av.CodecContext.create("libx264", "w")
            codec.options = {
                "preset": "ultrafast",  # aiortc's default (medium) costs ~94 % of a core at 720p30
                "tune": "zerolatency",
                "profile": "baseline",
                "bframes": "0",
                "x264-params": f"keyint=infinite:vbv-maxrate={self.bitrate_kbps}:vbv-bufsize={self.bitrate_kbps // 2}",
            }
        else:
            codec = av.CodecContext.create("libvpx", "w")
            # aiortc's realtime set (measured to hold 30 fps); ``error-resilient`` and a high
            # ``static-thresh`` made libvpx drop to ~6 fps here.
            codec.options = {
                "deadline": "realtime",
                "cpu-used": "-6",
                "lag-in-frames": "0",
                "partitions": "0",
                "static-thresh": "1",
                "undershoot-pct": "100",
                "overshoot-pct": "15",
                "minrate": str(self.bitrate_kbps * 1000),
                "maxrate": str(self.bitrate_kbps * 1000),
                "bufsize": str(self.bitrate_kbps * 1000),
            }
            codec.gop_size = 100_000
            codec.qmin, codec.qmax = 4, 56
        # aiortc picks one thread on a 2-core box, which gives 15 fps at 1080p; below that one thread
        # is cheaper (thread hand-offs cost more than they save on a busy 2-core host).
        codec.thread_count = 2 if self.config.width * self.config.height > 1280 * 720 else 1
        codec.width, codec.height = self.config.width, self.config.height
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = self.bitrate_kbps * 1000
        codec.framerate = fractions.Fraction(self.config.fps, 1)
        codec.time_base = fractions.Fraction(1, self.config.fps)
        return codec

    def _run(self, opened: asyncio.Future[None]) -> None:
        def settle(exc: BaseException | None) -> None:
            if not opened.done():
                if exc is None:
                    opened.set_result(None)
                else:
                    opened.set_exception(exc)

        try:
            container = av.open(
                f"{self.config.display}.0",
                format="x11grab",
                options={
                    "framerate": str(self.config.fps),
                    "video_size": f"{self.config.width}x{self.config.height}",
                    "draw_mouse": "1",
                },
            )
        except Exception as exc:
            self._loop.call_soon_threadsafe(
                settle, CaptureUnavailable(f"x11grab could not open {self.config.display}: {exc}")
            )
            return
        self._loop.call_soon_threadsafe(settle, None)
        encoder = self._encoder()
        index = 0
        last_idle_encode = 0.0
        try:
            for frame in container.decode(video=0):
                if self._stopping.is_set():
                    break
                grabbed_ns = time.monotonic_ns()
                if not self._active.is_set():
                    # Idle: encode IDLE_FPS frames a second so the encoder stays warm and ``ready`` holds.
                    if time.monotonic() - last_idle_encode < 1.0 / IDLE_FPS and not self._keyframe.is_set():
                        continue
                    last_idle_encode = time.monotonic()
                if self._bitrate_changed.is_set():
                    self._bitrate_changed.clear()
                    encoder = self._encoder()  # libx264/libvpx via PyAV take a new rate only on open
                    self._keyframe.set()
                picture = frame.reformat(format="yuv420p")
                picture.pts = index
                index += 1
                if self._keyframe.is_set():
                    self._keyframe.clear()
                    picture.pict_type = av.video.frame.PictureType.I
                data = b"".join(bytes(packet) for packet in encoder.encode(picture))
                if data:
                    self._publish_threadsafe(
                        EncodedFrame(data, grabbed_ns, is_keyframe(self.config.codec, data))
                    )
        except Exception as exc:
            self._error = f"x11grab capture of {self.config.display} stopped: {exc}"
            log.exception("x11grab capture stopped")
        finally:
            container.close()
