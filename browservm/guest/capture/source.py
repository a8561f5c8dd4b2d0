"""A display captured and encoded once (:class:`VideoSource`), fanned out to one :class:`Subscription` per
viewer; what every source is configured with (:class:`CaptureConfig`)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace

from browservm.guest.capture.frame import Codec, EncodedFrame

log = logging.getLogger(__name__)

IDLE_FPS = 5.0
"""Capture rate while no viewer watches: keeps the encoder warm cheaply. Not lower: a viewer that joins
waits up to one idle interval for its first frame (1 fps gave 450 ms to first frame, 5 fps 50-190 ms)."""
KEYFRAME_MIN_INTERVAL_S = 0.25
"""Keyframe requests closer together than this are merged (a PLI storm must not become an I-frame storm)."""
SUBSCRIBER_QUEUE = 8
"""Frames a viewer may lag behind before it is reset to the next keyframe."""
REFRESH_S = 1.0
"""On a still screen, one frame this often: a lost frame is then repaired within a second or so."""


class CaptureUnavailable(Exception):
    """A capture source could not start; the message says why and what to try."""


@dataclass(frozen=True)
class CaptureConfig:
    display: str
    """The X display, e.g. ``:99``."""
    width: int
    height: int
    fps: int
    """Capture rate while someone watches (:data:`IDLE_FPS` while nobody does)."""
    codec: Codec
    min_kbps: int
    max_kbps: int
    """The bounds the bitrate follows the receivers' estimate within."""
    refresh_s: float = REFRESH_S


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

    @property
    def pending(self) -> int:
        """Frames encoded for this viewer and not yet sent."""
        return self._queue.qsize()

    def request_keyframe(self) -> None:
        self._source.request_keyframe()

    def restart(self) -> None:
        """The stream starts over (a new size): drop what is queued, resume at the next keyframe."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._need_keyframe = True

    def close(self) -> None:
        self.closed = True
        self._source.unsubscribe(self)


class VideoSource(abc.ABC):
    """A display captured and encoded once; frames go to every :class:`Subscription`."""

    name: str

    def __init__(self, config: CaptureConfig) -> None:
        self.config = config
        self.refresh_s = config.refresh_s
        """Tunable while running (the tests shorten and lengthen it)."""
        self.bitrate_kbps = max(config.min_kbps, min(config.max_kbps, 2500))
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

    async def resize(self, width: int, height: int) -> None:
        """Capture and encode at a new size: the capture starts over, and every viewer goes on at the
        new stream's first keyframe (whose parameter sets carry the size; browsers' decoders follow).
        Raises :class:`CaptureUnavailable` if the capture does not start again."""
        self.stop()
        self.config = replace(self.config, width=width, height=height)
        for subscription in self._subscribers:
            subscription.restart()
        await self.start()
        self._apply_active(bool(self._subscribers))
        self._apply_bitrate(self.bitrate_kbps)
        self.request_keyframe(force=True)

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
        kbps = max(self.config.min_kbps, min(self.config.max_kbps, kbps))
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
