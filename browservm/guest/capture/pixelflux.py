"""The main capture source: pixelflux (selkies' Rust capture and encode) over XShm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from browservm.guest.capture.frame import EncodedFrame, is_keyframe
from browservm.guest.capture.source import IDLE_FPS, CaptureConfig, CaptureUnavailable, VideoSource

TAIL_S = 0.1
"""A change, and an input event, is followed by one more frame within this time. A receiver cannot always
tell that a frame is complete (aiortc's waits for the next frame's first packet, and a lost last packet
is noticed only when a later one arrives), so the newest picture must not be the last thing sent."""
PULSE_SETTLE_S = 0.5
"""Frames within this time after a forced frame earn no tail of their own: libvpx answers a forced frame
with a short cleanup burst, which would otherwise call for another forced frame, and so on."""
PACE_INTERVAL_S = 0.05


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

    def __init__(self, config: CaptureConfig) -> None:
        super().__init__(config)
        self._capture: Any = None
        self._settings: Any = None
        self._streaming = False
        self._pulse_pending = False
        self._last_pulse_at = 0.0
        self._last_frame_at = 0.0
        self._tail_at: float | None = None
        self._tails = self.config.codec == "h264"
        self._pacer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            import pixelflux
        except ImportError as exc:
            raise CaptureUnavailable(
                f"pixelflux is not installed ({exc}); pip install pixelflux==2.2.1"
            ) from exc
        settings = pixelflux.CaptureSettings()
        settings.capture_width = self.config.width
        settings.capture_height = self.config.height
        settings.capture_x = 0
        settings.capture_y = 0
        settings.target_fps = float(IDLE_FPS)
        settings.capture_cursor = True
        settings.codec = self.config.codec
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
        codec = self.config.codec

        def on_frame(frame: Any) -> None:  # pixelflux's encode thread
            data = bytes(frame)
            if data:
                self._publish_threadsafe(EncodedFrame(data, frame.capture_ns, is_keyframe(codec, data)))

        # pixelflux opens the display named by $DISPLAY, from its capture and cursor threads alike, for
        # as long as it runs; this process streams exactly one display.
        os.environ["DISPLAY"] = self.config.display
        try:
            await asyncio.to_thread(capture.start_capture, on_frame, settings)
        except Exception as exc:
            raise CaptureUnavailable(f"pixelflux could not capture {self.config.display}: {exc}") from exc
        state, error = capture.capture_state()
        if state == "failed":
            raise CaptureUnavailable(f"pixelflux capture of {self.config.display} failed: {error}")
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
            self._settings.target_fps = float(self.config.fps if active else IDLE_FPS)
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
