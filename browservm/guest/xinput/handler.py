"""Data-channel messages in, X input out: what the streamer calls for each ``input`` message."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

from pydantic import ValidationError

from browservm.guest.xinput.clipboard import ClipboardBridge
from browservm.guest.xinput.messages import (
    INPUT,
    Button,
    ClipboardText,
    InputMessage,
    Key,
    Move,
    Ping,
    Release,
    Resize,
    Text,
    Wheel,
)
from browservm.guest.xinput.xtest import XInput

log = logging.getLogger(__name__)


class InputHandler:
    """Turns data-channel messages into X input. ``handle`` returns the reply to send back, if any."""

    def __init__(
        self,
        xinput: XInput,
        clipboard: ClipboardBridge | None,
        on_resize: Callable[[int, int], None] | None = None,
    ) -> None:
        self._x = xinput
        self._clipboard = clipboard
        self._on_resize = on_resize

    def handle(self, raw: str | bytes) -> str | None:
        try:
            message = INPUT.validate_json(raw)
        except ValidationError as exc:
            log.debug("ignoring malformed input message %.200r: %s", raw, exc.errors()[0]["msg"])
            return None
        try:
            return self._apply(message)
        except Exception:  # a bad X request must not take the streamer down
            log.debug("input message %.200r failed", raw, exc_info=True)
            return None

    def _apply(self, message: InputMessage) -> str | None:
        match message:
            case Move(x=x, y=y):
                self._x.move(x, y)
            case Button(t=t, button=button, x=x, y=y):
                self._x.button(button, t == "down", x, y)
            case Wheel(dx=dx, dy=dy, x=x, y=y):
                self._x.wheel(dx, dy, x, y)
            case Key(key=key, code=code, down=down):
                self._x.key(key, code, down)
            case Text(text=text):
                self._x.type_text(text)
            case ClipboardText(text=text):
                if self._clipboard is not None:
                    self._clipboard.set_text(text)
            case Ping(ts=ts):
                return json.dumps({"t": "pong", "ts": ts})
            case Release():
                self._x.release_all()
            case Resize(width=width, height=height):
                if self._on_resize is not None:
                    self._on_resize(width, height)
        return None

    def release_all(self) -> None:
        with contextlib.suppress(Exception):
            self._x.release_all()
