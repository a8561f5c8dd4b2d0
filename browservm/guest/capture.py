"""Capture and encode the guest's X display once, and fan the encoded frames out to every viewer.

Two sources produce the same thing, :class:`EncodedFrame` (one access unit of H.264 Annex-B or one VP8
frame):

* :class:`PixelfluxSource`: pixelflux 2.2.1 (selkies' Rust capture+encode) over XShm with x264 or libvpx.
  It encodes only when the screen changed (pixelflux's change detection), streams every frame for a
  moment after each input event, and always sends one more frame shortly after a change and one a second
  on a still screen (see :class:`PixelfluxSource`). ``request_idr_frame()`` yields a keyframe with the
  next frame, on a still screen too.
* :class:`X11GrabSource`: the fallback, PyAV's ``x11grab`` input and PyAV's libx264/libvpx encoders on a
  thread, with the settings aiortc's own encoders lack on a small box (x264 ``ultrafast`` and
  ``zerolatency``, VP8 on two threads in realtime mode, bitrate within the stream's bounds).

Encoding happens once per session, not once per viewer: each viewer's :class:`EncodedVideoTrack` yields
``av.Packet`` objects, so aiortc's ``RTCRtpSender`` only packetizes them (``encoder.pack``). A viewer that
joins, or falls behind, waits for the next keyframe and asks the source for one.

The cursor is drawn into the frames by the capture (pixelflux ``capture_cursor``, x11grab ``draw_mouse``),
so the viewer needs no cursor of its own.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fractions
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

Codec = Literal["h264", "vp8"]

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
IDLE_FPS = 5.0
"""Capture rate while no viewer watches: keeps the encoder warm cheaply. Not lower: a viewer that joins
waits up to one idle interval for its first frame (1 fps gave 450 ms to first frame, 5 fps 50-190 ms)."""
KEYFRAME_MIN_INTERVAL_S = 0.25
"""Keyframe requests closer together than this are merged (a PLI storm must not become an I-frame storm)."""
SUBSCRIBER_QUEUE = 8
"""Frames a viewer may lag behind before it is reset to the next keyframe."""
TAIL_S = 0.1
"""A change, and an input event, is followed by one more frame within this time. A receiver cannot always
tell that a frame is complete (aiortc's waits for the next frame's first packet, and a lost last packet
is noticed only when a later one arrives), so the newest picture must not be the last thing sent."""
REFRESH_S = 1.0
"""On a still screen, one frame this often: a lost frame is then repaired within a second or so."""
PULSE_SETTLE_S = 0.5
"""Frames within this time after a forced frame earn no tail of their own: libvpx answers a forced frame
with a short cleanup burst, which would otherwise call for another forced frame, and so on."""
PACE_INTERVAL_S = 0.05


class CaptureUnavailable(Exception):
    """A capture source could not start; the message says why and what to try."""


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    data: bytes
    capture_ns: int
    """CLOCK_MONOTONIC nanoseconds when the picture was grabbed (``time.monotonic_ns`` clock)."""
    keyframe: bool


def is_keyframe(codec: Codec, data: bytes) -> bool:
    """Whether ``data`` decodes on its own: an H.264 access unit holding an IDR slice, or a VP8 key frame."""
    if codec == "vp8":
        return len(data) > 0 and data[0] & 0x01 == 0  # VP8 frame tag bit 0: 0 = key frame
    start = 0
    while True:
        start = data.find(b"\x00\x00\x01", start)
        if start < 0 or start + 3 >= len(data):
            return False
        nal_type = data[start + 3] & 0x1F
        if nal_type == 5:
            return True
        if nal_type in (1, 2, 3, 4):  # a non-IDR slice comes first: not a keyframe
            return False
        start += 3


# ---------------------------------------------------------------------------------------------- fan-out


class Subscription:
    """One viewer's queue of frames. Starts at a keyframe; resets to the next keyframe when it overflows."""

    def __init__(self, source: VideoSource) -> None:
        self._source = source
        self._queue: asyncio.Queue[EncodedFrame] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._need_keyframe = True
        self.closed = False

    def offer(self, frame: EncodedFrame) -> None:
        if self._need_keyframe:
            if not frame.keyframe:
                # Ask again while waiting: an earlier request may have been merged away or lost.
                self._source.request_keyframe()
                return
            self._need_keyframe = False
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            # The viewer's sender fell behind: drop what it has queued and restart it at a keyframe,
            # rather than feeding it deltas whose references it never got.
            while not self._queue.empty():
                self._queue.get_nowait()
            log.debug("viewer fell %d frames behind; restarting it at the next keyframe", SUBSCRIBER_QUEUE)
            self._need_keyframe = True
            self._source.request_keyframe()

    async def get(self) -> EncodedFrame:
        return await self._queue.get()

    def request_keyframe(self) -> None:
        self._source.request_keyframe()

    def close(self) -> None:
        self.closed = True
        self._source.unsubscribe(self)


class VideoSource(abc.ABC):
    """A display captured and encoded once; frames go to every :class:`Subscription`."""

    name: str

    def __init__(
        self,
        display: str,
        width: int,
        height: int,
        fps: int,
        codec: Codec,
        min_kbps: int,
        max_kbps: int,
        *,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.display = display
        self.refresh_s = refresh_s
        self.width, self.height, self.fps, self.codec = width, height, fps, codec
        self.min_kbps, self.max_kbps = min_kbps, max_kbps
        self.bitrate_kbps = max(min_kbps, min(max_kbps, 2500))
        self.first_frame = asyncio.Event()
        self.frames = 0
        self.bytes = 0
        self._subscribers: list[Subscription] = []
        self._loop = asyncio.get_running_loop()
        self._last_keyframe_request = 0.0

    @abc.abstractmethod
    async def start(self) -> None:
        """Start capturing; returns once the capture runs. Raises :class:`CaptureUnavailable`."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def _force_keyframe(self) -> None: ...

    @abc.abstractmethod
    def _apply_bitrate(self, kbps: int) -> None: ...

    @abc.abstractmethod
    def _apply_active(self, active: bool) -> None: ...

    def failure(self) -> str | None:
        """Why the running capture died, or ``None`` while it is healthy."""
        return None

    def note_input(self) -> None:
        """A viewer's input event was injected: its effect must reach the viewers without delay."""

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.append(subscription)
        if len(self._subscribers) == 1:
            self._apply_active(True)
        self.request_keyframe(force=True)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)
        if not self._subscribers:
            self._apply_active(False)

    @property
    def viewers(self) -> int:
        return len(self._subscribers)

    def request_keyframe(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_keyframe_request >= KEYFRAME_MIN_INTERVAL_S:
            self._last_keyframe_request = now
            self._force_keyframe()

    def set_bitrate(self, kbps: int) -> None:
        """Follow the receivers' estimate, within the stream's bounds; changes under 10 % are ignored."""
        kbps = max(self.min_kbps, min(self.max_kbps, kbps))
        if abs(kbps - self.bitrate_kbps) > 0.1 * self.bitrate_kbps:
            log.debug("%s bitrate %d -> %d kbit/s", self.name, self.bitrate_kbps, kbps)
            self.bitrate_kbps = kbps
            self._apply_bitrate(kbps)

    def _publish(self, frame: EncodedFrame) -> None:
        """Called on the event loop for every encoded frame."""
        self.frames += 1
        self.bytes += len(frame.data)
        if not self.first_frame.is_set():
            self.first_frame.set()
        for subscription in list(self._subscribers):
            subscription.offer(frame)

    def _publish_threadsafe(self, frame: EncodedFrame) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while a frame was in flight
            self._loop.call_soon_threadsafe(self._publish, frame)


# ---------------------------------------------------------------------------------------------- pixelflux


class PixelfluxSource(VideoSource):
    """pixelflux capture and encode, paced for a screen that is mostly still.

    pixelflux runs with change detection (``video_streaming_mode`` off): it grabs at the target rate but
    encodes only frames whose pixels changed, so a still page costs about 1 % of a core instead of the
    10 % of encoding every frame. Its detection compares the captured pixels (cursor included), so it
    does not miss changes (checked against the screen after animations stop). What once looked like a
    missed change after a click was the *delivery* of the last change: in H.264 nothing follows it,
    and aiortc's receiver completes a frame only when the next one starts. So one frame is forced,
    by switching streaming mode on for one frame through ``update_tunables`` (live, no encoder
    restart; a near-empty predicted frame, tens of bytes in H.264):

    * :data:`TAIL_S` after the last frame of a change, and after the last input event
      (:meth:`note_input`), whether or not the page answered it;
    * every :data:`REFRESH_S` on a still screen, so a lost frame is repaired and nothing the change
      detection could have missed stays on screen for longer than that.

    VP8 gets no tail: libvpx follows every change, and every forced frame, with a cleanup burst of its
    own (about seven frames, 170-400 ms later, measured), so the change is followed anyway and a tail
    would only start another burst.
    """

    name = "pixelflux"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._capture: Any = None
        self._settings: Any = None
        self._streaming = False
        self._pulse_pending = False
        self._last_pulse_at = 0.0
        self._last_frame_at = 0.0
        self._tail_at: float | None = None
        self._tails = self.codec == "h264"
        self._pacer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            import pixelflux
        except ImportError as exc:
            raise CaptureUnavailable(
                f"pixelflux is not installed ({exc}); pip install pixelflux==2.2.1"
            ) from exc
        settings = pixelflux.CaptureSettings()
        settings.capture_width = self.width
        settings.capture_height = self.height
        settings.capture_x = 0
        settings.capture_y = 0
        settings.target_fps = float(IDLE_FPS)
        settings.capture_cursor = True
        settings.codec = self.codec
        settings.use_wayland = False
        settings.use_cpu = True  # no GPU in a sandbox; skips the hardware probes
        settings.omit_stripe_headers = True  # a plain bitstream, as RTP packetizers expect
        settings.video_fullframe = True  # one access unit per frame, not stripes
        settings.keyframe_interval_s = 0.0  # keyframes on demand (viewer joins, PLI)
        settings.video_cbr_mode = True  # so the bitrate can follow the receivers' estimate
        settings.video_bitrate_kbps = self.bitrate_kbps
        settings.video_reference_frames = 1
        # One thread per frame: on this 2-core class of host x264 already gets one thread, and handing
        # the colour conversion between threads cost about 1 % of a core more at 720p30 (1080p30
        # still holds 30 fps in both codecs).
        settings.cpu_encode_threading = False
        settings.video_streaming_mode = False  # encode changed frames only; see the class docstring
        settings.auto_adjust_screen_capture_size = False
        settings.debug_logging = False
        capture = pixelflux.ScreenCapture()
        codec = self.codec

        def on_frame(frame: Any) -> None:  # pixelflux's encode thread
            data = bytes(frame)
            if data:
                self._publish_threadsafe(EncodedFrame(data, frame.capture_ns, is_keyframe(codec, data)))

        # pixelflux opens the display named by $DISPLAY, from its capture and cursor threads alike, for
        # as long as it runs; this process streams exactly one display.
        os.environ["DISPLAY"] = self.display
        try:
            await asyncio.to_thread(capture.start_capture, on_frame, settings)
        except Exception as exc:
            raise CaptureUnavailable(f"pixelflux could not capture {self.display}: {exc}") from exc
        state, error = capture.capture_state()
        if state == "failed":
            raise CaptureUnavailable(f"pixelflux capture of {self.display} failed: {error}")
        self._capture = capture
        self._settings = settings
        self._last_frame_at = time.monotonic()
        self._pacer = asyncio.create_task(self._pace(), name="pixelflux-pacer")
        self._force_keyframe()

    def stop(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        if self._capture is not None:
            with contextlib.suppress(Exception):
                self._capture.stop_capture()
            self._capture = None

    def failure(self) -> str | None:
        if self._capture is None:
            return None
        state, error = self._capture.capture_state()
        return f"pixelflux capture {state}: {error}" if state == "failed" else None

    def _force_keyframe(self) -> None:
        if self._capture is not None:
            self._capture.request_idr_frame()

    def _apply_bitrate(self, kbps: int) -> None:
        if self._capture is not None:
            self._settings.video_bitrate_kbps = kbps  # ``update_tunables`` takes the whole settings object
            self._capture.update_video_bitrate(kbps)

    def _apply_active(self, active: bool) -> None:
        if self._capture is not None:
            self._settings.target_fps = float(self.fps if active else IDLE_FPS)
            self._capture.update_framerate(self._settings.target_fps)

    def stats(self) -> dict[str, Any]:
        return dict(self._capture.stream_stats()) if self._capture is not None else {}

    def note_input(self) -> None:
        if self._tails:
            self._tail_at = time.monotonic() + TAIL_S

    def _publish(self, frame: EncodedFrame) -> None:
        now = time.monotonic()
        self._last_frame_at = now
        if self._pulse_pending:  # the forced frame (or a change that came first): one is enough
            self._pulse_pending = False
            self._last_pulse_at = now
            self._set_streaming(False)
        elif self._tails and now - self._last_pulse_at >= PULSE_SETTLE_S:
            self._tail_at = now + TAIL_S  # pushed back by every frame of the change, so it follows the last
        super()._publish(frame)

    def _pulse(self) -> None:
        """Have pixelflux encode its next grab whether or not it changed: one fresh frame."""
        self._tail_at = None
        self._pulse_pending = True
        self._set_streaming(True)

    def _set_streaming(self, on: bool) -> None:
        if on != self._streaming and self._capture is not None:
            self._streaming = on
            self._settings.video_streaming_mode = on
            self._capture.update_tunables(self._settings)

    async def _pace(self) -> None:
        while True:
            await asyncio.sleep(PACE_INTERVAL_S)
            if not self.viewers:
                self._tail_at = None
                continue
            now = time.monotonic()
            if self._pulse_pending:
                continue
            tail_due = self._tail_at is not None and now >= self._tail_at
            if tail_due or now - self._last_frame_at >= self.refresh_s:
                self._pulse()


# ---------------------------------------------------------------------------------------------- x11grab


class X11GrabSource(VideoSource):
    """PyAV ``x11grab`` + libx264/libvpx on one thread. Costlier than pixelflux: it encodes every frame."""

    name = "x11grab"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._keyframe = threading.Event()
        self._active = threading.Event()
        self._error: str | None = None
        self._bitrate_changed = threading.Event()

    async def start(self) -> None:
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
        if self.codec == "h264":
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
        codec.thread_count = 2 if self.width * self.height > 1280 * 720 else 1
        codec.width, codec.height = self.width, self.height
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = self.bitrate_kbps * 1000
        codec.framerate = fractions.Fraction(self.fps, 1)
        codec.time_base = fractions.Fraction(1, self.fps)
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
                f"{self.display}.0",
                format="x11grab",
                options={
                    "framerate": str(self.fps),
                    "video_size": f"{self.width}x{self.height}",
                    "draw_mouse": "1",
                },
            )
        except Exception as exc:
            self._loop.call_soon_threadsafe(
                settle, CaptureUnavailable(f"x11grab could not open {self.display}: {exc}")
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
                    # Idle: encode one frame a second so the encoder stays warm and ``ready`` holds.
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
                    self._publish_threadsafe(EncodedFrame(data, grabbed_ns, is_keyframe(self.codec, data)))
        except Exception as exc:
            self._error = f"x11grab capture of {self.display} stopped: {exc}"
            log.exception("x11grab capture stopped")
        finally:
            container.close()


def create_source(
    kind: Literal["pixelflux", "x11grab"],
    display: str,
    width: int,
    height: int,
    fps: int,
    codec: Codec,
    min_kbps: int,
    max_kbps: int,
    *,
    refresh_s: float = REFRESH_S,
) -> VideoSource:
    cls: type[VideoSource] = PixelfluxSource if kind == "pixelflux" else X11GrabSource
    return cls(display, width, height, fps, codec, min_kbps, max_kbps, refresh_s=refresh_s)


# ---------------------------------------------------------------------------------------------- track


class EncodedVideoTrack(MediaStreamTrack):
    """A video track that yields already-encoded frames as ``av.Packet``, so aiortc only packetizes."""

    kind = "video"

    def __init__(self, subscription: Subscription) -> None:
        super().__init__()
        self.subscription = subscription

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.subscription.get()
        packet = av.Packet(frame.data)
        packet.pts = frame.capture_ns * VIDEO_CLOCK // 1_000_000_000
        packet.time_base = VIDEO_TIME_BASE
        return packet

    def stop(self) -> None:
        if not self.subscription.closed:
            self.subscription.close()
        super().stop()
