"""Input from a remote viewer into the guest's X display: pointer and keys via XTEST, and the clipboard.

The viewer page sends JSON messages over the WebRTC data channel labelled ``input``; the streamer hands
each one to :meth:`InputHandler.handle`. The message set (``t`` is the discriminator):

=============================================================  ==============================================
message                                                        effect
=============================================================  ==============================================
``{"t":"move","x":int,"y":int}``                               move the pointer (remote screen pixels)
``{"t":"down"|"up","button":1|2|3,"x":int,"y":int}``           press / release a button at x,y (1 left,
                                                               2 middle, 3 right)
``{"t":"wheel","dx":float,"dy":float,"x":int,"y":int}``        scroll at x,y; dx/dy are ``WheelEvent``
                                                               deltas in CSS pixels (``deltaMode`` 0), one
                                                               wheel click per 100 px, remainders carried
``{"t":"key","key":str,"code":str,"down":bool}``               one key transition; ``key``/``code`` are
                                                               ``KeyboardEvent.key``/``.code``. Modifiers
                                                               are their own key events, so ctrl+v works
``{"t":"text","text":str}``                                    type a string (any Unicode; characters the
                                                               keymap lacks are typed through spare
                                                               keycodes remapped on the fly)
``{"t":"clipboard","text":str}``                               set the remote CLIPBOARD and PRIMARY
``{"t":"ping","ts":number}``                                   answered with ``{"t":"pong","ts":same}``
``{"t":"release"}``                                            release every key and button still held
                                                               (sent by a page losing focus)
=============================================================  ==============================================

From the remote side the viewer receives ``{"t":"clipboard","text":str}`` whenever the remote CLIPBOARD
changes (XFixes selection notify), and ``{"t":"pong","ts":...}``.

Coordinates are clamped to the screen. Malformed or unknown messages are logged at debug and ignored:
a viewer must never be able to crash the streamer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from Xlib import XK, X, Xatom
from Xlib import display as xdisplay
from Xlib.error import DisplayError
from Xlib.ext import xfixes, xtest
from Xlib.protocol import event as xevent

log = logging.getLogger(__name__)

WHEEL_STEP_PX = 100.0
"""CSS pixels of ``WheelEvent`` delta per X wheel click (Chrome scrolls ~100 px per notch)."""

MAX_CLIPBOARD_BYTES = 1 << 20
"""Clipboard text larger than this is refused (it would need the INCR protocol; nobody pastes 1 MiB)."""


class InputUnavailable(Exception):
    """The X display cannot take injected input (no display, or no XTEST/XFixes extension)."""


# ---------------------------------------------------------------------------------------------- messages


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Move(_Msg):
    t: Literal["move"]
    x: int
    y: int


class Button(_Msg):
    t: Literal["down", "up"]
    button: int = Field(1, ge=1, le=3)
    x: int
    y: int


class Wheel(_Msg):
    t: Literal["wheel"]
    dx: float = 0.0
    dy: float = 0.0
    x: int
    y: int


class Key(_Msg):
    t: Literal["key"]
    key: str = Field(max_length=64)
    code: str = Field("", max_length=64)
    down: bool


class Text(_Msg):
    t: Literal["text"]
    text: str = Field(max_length=10_000)


class ClipboardText(_Msg):
    t: Literal["clipboard"]
    text: str


class Ping(_Msg):
    t: Literal["ping"]
    ts: float | int | str


class Release(_Msg):
    t: Literal["release"]


InputMessage = Annotated[
    Move | Button | Wheel | Key | Text | ClipboardText | Ping | Release, Field(discriminator="t")
]
_INPUT: TypeAdapter[InputMessage] = TypeAdapter(InputMessage)


# ---------------------------------------------------------------------------------------------- keys

# KeyboardEvent.key names that differ from X keysym names. Sided modifiers take their side from ``code``.
_NAMED_KEYS: dict[str, str] = {
    "Enter": "Return",
    "Backspace": "BackSpace",
    "Tab": "Tab",
    "Escape": "Escape",
    "Esc": "Escape",
    "Delete": "Delete",
    "Insert": "Insert",
    "Home": "Home",
    "End": "End",
    "PageUp": "Prior",
    "PageDown": "Next",
    "ArrowLeft": "Left",
    "ArrowRight": "Right",
    "ArrowUp": "Up",
    "ArrowDown": "Down",
    "CapsLock": "Caps_Lock",
    "NumLock": "Num_Lock",
    "ScrollLock": "Scroll_Lock",
    "Pause": "Pause",
    "PrintScreen": "Print",
    "ContextMenu": "Menu",
    "AltGraph": "ISO_Level3_Shift",
    " ": "space",
    "Spacebar": "space",
}
_SIDED = {"Shift": "Shift", "Control": "Control", "Alt": "Alt", "Meta": "Super", "OS": "Super"}
_SHIFT_KEYSYMS = (XK.XK_Shift_L, XK.XK_Shift_R)


def keysym_for_char(char: str) -> int:
    """The X keysym that types ``char``: Latin-1 keysyms equal their code point, the rest are
    ``0x01000000 + code point`` (X11 Unicode keysyms)."""
    point = ord(char)
    if 0x20 <= point <= 0x7E or 0xA0 <= point <= 0xFF:
        return point
    if char == "\n" or char == "\r":
        return int(XK.XK_Return)
    if char == "\t":
        return int(XK.XK_Tab)
    return 0x01000000 + point


def keysym_for_key(key: str, code: str) -> int:
    """The keysym for a browser ``KeyboardEvent``; 0 when it names nothing X knows."""
    if key in _SIDED:
        side = "R" if code.endswith("Right") else "L"
        return int(XK.string_to_keysym(f"{_SIDED[key]}_{side}"))
    if key in _NAMED_KEYS:
        return int(XK.string_to_keysym(_NAMED_KEYS[key]))
    if len(key) == 1:
        return keysym_for_char(key)
    return int(XK.string_to_keysym(key))  # F1..F12 match; "Dead", "Unidentified" give 0


# ---------------------------------------------------------------------------------------------- XTEST


class XInput:
    """Pointer and keyboard injection into one X display through XTEST.

    Not thread-safe: use it from one thread (the streamer's event loop). Each call flushes, so the events
    reach the server at once without a round trip.
    """

    def __init__(self, display: str) -> None:
        try:
            self._d = xdisplay.Display(display)
        except (DisplayError, OSError) as exc:
            raise InputUnavailable(f"cannot open X display {display!r}: {exc}; is Xvfb running?") from exc
        if not self._d.has_extension("XTEST"):
            self._d.close()
            raise InputUnavailable(
                f"X display {display!r} has no XTEST extension; start Xvfb with +extension XTEST"
            )
        root = self._d.screen().root
        geometry = root.get_geometry()
        self.width: int = geometry.width
        self.height: int = geometry.height
        self._min_keycode: int = self._d.display.info.min_keycode
        self._max_keycode: int = self._d.display.info.max_keycode
        self._spare = self._find_spare_keycodes()
        self._spare_next = 0
        self._remapped: dict[int, int] = {}  # keysym -> spare keycode now carrying it
        self._held_keys: dict[str, int] = {}  # KeyboardEvent.code (or key) -> keycode pressed
        self._fake_shift: dict[str, int] = {}  # code -> shift keycode we pressed around that key
        self._held_buttons: set[int] = set()
        self._wheel_acc = [0.0, 0.0]
        self._shift_keycode = self._d.keysym_to_keycode(XK.XK_Shift_L)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release_all()
            self._restore_spare_keycodes()
        self._d.close()

    # ------------------------------------------------------------------------------------------ pointer

    def _clamp(self, x: int, y: int) -> tuple[int, int]:
        return max(0, min(self.width - 1, x)), max(0, min(self.height - 1, y))

    def move(self, x: int, y: int) -> None:
        x, y = self._clamp(x, y)
        xtest.fake_input(self._d, X.MotionNotify, x=x, y=y)
        self._d.flush()

    def button(self, button: int, down: bool, x: int, y: int) -> None:
        x, y = self._clamp(x, y)
        xtest.fake_input(self._d, X.MotionNotify, x=x, y=y)
        xtest.fake_input(self._d, X.ButtonPress if down else X.ButtonRelease, button)
        if down:
            self._held_buttons.add(button)
        else:
            self._held_buttons.discard(button)
        self._d.flush()

    def click(self, x: int, y: int, button: int = 1) -> None:
        self.button(button, True, x, y)
        self.button(button, False, x, y)

    def wheel(self, dx: float, dy: float, x: int, y: int) -> None:
        x, y = self._clamp(x, y)
        xtest.fake_input(self._d, X.MotionNotify, x=x, y=y)
        # X wheels are buttons: 4 up, 5 down, 6 left, 7 right.
        for axis, delta, negative, positive in ((0, dx, 6, 7), (1, dy, 4, 5)):
            self._wheel_acc[axis] += delta
            clicks = int(self._wheel_acc[axis] / WHEEL_STEP_PX)
            self._wheel_acc[axis] -= clicks * WHEEL_STEP_PX
            button = positive if clicks > 0 else negative
            for _ in range(min(abs(clicks), 50)):
                xtest.fake_input(self._d, X.ButtonPress, button)
                xtest.fake_input(self._d, X.ButtonRelease, button)
        self._d.flush()

    # ------------------------------------------------------------------------------------------ keys

    def key(self, key: str, code: str, down: bool) -> None:
        """One browser key transition. Printable keys get Shift adjusted to what the remote keymap needs
        unless Control/Alt/Super are held (then the client's modifiers are taken as meant: ctrl+shift+t)."""
        ident = code or key
        if not down:
            keycode = self._held_keys.pop(ident, None)
            if keycode is None:
                return
            xtest.fake_input(self._d, X.KeyRelease, keycode)
            shift = self._fake_shift.pop(ident, None)
            if shift is not None:
                xtest.fake_input(self._d, X.KeyPress if shift < 0 else X.KeyRelease, abs(shift))
            self._d.flush()
            return
        if ident in self._held_keys:  # auto-repeat: release first so X sees a fresh press
            xtest.fake_input(self._d, X.KeyRelease, self._held_keys[ident])
        keysym = keysym_for_key(key, code)
        if not keysym:
            log.debug("ignoring key %r (%r): no X keysym", key, code)
            return
        keycode, index = self._keycode_for(keysym)
        if keycode == 0:
            return
        if len(key) == 1 and not self._chording():
            want_shift = index == 1
            shifts = self._held_shift_keycodes()
            if want_shift and not shifts:
                xtest.fake_input(self._d, X.KeyPress, self._shift_keycode)
                self._fake_shift[ident] = self._shift_keycode
            elif not want_shift and shifts and index == 0 and self._keysym_shifted_differs(keycode):
                for shift in shifts:  # the client holds shift but the remote char is unshifted
                    xtest.fake_input(self._d, X.KeyRelease, shift)
                self._fake_shift[ident] = -shifts[0]
        xtest.fake_input(self._d, X.KeyPress, keycode)
        self._held_keys[ident] = keycode
        self._d.flush()

    def type_text(self, text: str) -> None:
        """Type ``text`` as key presses; Shift is added where the keymap needs it."""
        held_shift = self._held_shift_keycodes()
        for shift in held_shift:
            xtest.fake_input(self._d, X.KeyRelease, shift)
        for char in text:
            if char == "\r":
                continue
            keycode, index = self._keycode_for(keysym_for_char(char))
            if keycode == 0:
                continue
            if index == 1:
                xtest.fake_input(self._d, X.KeyPress, self._shift_keycode)
            xtest.fake_input(self._d, X.KeyPress, keycode)
            xtest.fake_input(self._d, X.KeyRelease, keycode)
            if index == 1:
                xtest.fake_input(self._d, X.KeyRelease, self._shift_keycode)
        for shift in held_shift:
            xtest.fake_input(self._d, X.KeyPress, shift)
        self._d.flush()

    def release_all(self) -> None:
        for keycode in self._held_keys.values():
            xtest.fake_input(self._d, X.KeyRelease, keycode)
        for shift in self._fake_shift.values():
            if shift > 0:
                xtest.fake_input(self._d, X.KeyRelease, shift)
        for button in self._held_buttons:
            xtest.fake_input(self._d, X.ButtonRelease, button)
        self._held_keys.clear()
        self._fake_shift.clear()
        self._held_buttons.clear()
        self._d.flush()

    def _chording(self) -> bool:
        chord = {
            self._d.keysym_to_keycode(XK.string_to_keysym(name))
            for name in ("Control_L", "Control_R", "Alt_L", "Alt_R", "Super_L", "Super_R")
        }
        return any(keycode in chord for keycode in self._held_keys.values())

    def _held_shift_keycodes(self) -> list[int]:
        shifts = {self._d.keysym_to_keycode(keysym) for keysym in _SHIFT_KEYSYMS}
        return [keycode for keycode in self._held_keys.values() if keycode in shifts]

    def _keysym_shifted_differs(self, keycode: int) -> bool:
        plain = self._d.keycode_to_keysym(keycode, 0)
        shifted = self._d.keycode_to_keysym(keycode, 1)
        return bool(shifted) and shifted != plain

    def _keycode_for(self, keysym: int) -> tuple[int, int]:
        """(keycode, shift level 0/1) producing ``keysym``, remapping a spare keycode when the keymap has
        none. Returns (0, 0) when no spare keycode exists."""
        for keycode, index in self._d.keysym_to_keycodes(keysym):
            if index in (0, 1):
                return keycode, index
        if keysym in self._remapped:
            return self._remapped[keysym], 0
        if not self._spare:
            log.debug("no spare keycode to type keysym %#x", keysym)
            return 0, 0
        # Round-robin over the spares so a keycode just typed is not remapped while the client may
        # still be translating its events with the previous mapping.
        keycode = self._spare[self._spare_next % len(self._spare)]
        self._spare_next += 1
        for old_keysym, old_keycode in list(self._remapped.items()):
            if old_keycode == keycode:
                del self._remapped[old_keysym]
        self._d.change_keyboard_mapping(keycode, [(keysym, keysym)])
        self._d.sync()  # the mapping must exist before the key event that uses it
        self._remapped[keysym] = keycode
        return keycode, 0

    def _find_spare_keycodes(self) -> list[int]:
        count = self._max_keycode - self._min_keycode + 1
        mapping = self._d.get_keyboard_mapping(self._min_keycode, count)
        spare = [
            self._min_keycode + offset
            for offset, keysyms in enumerate(mapping)
            if not any(keysyms) and self._min_keycode + offset > 8
        ]
        return spare[-16:]

    def _restore_spare_keycodes(self) -> None:
        for keycode in set(self._remapped.values()):
            self._d.change_keyboard_mapping(keycode, [(0, 0)])
        self._remapped.clear()
        self._d.sync()


# ---------------------------------------------------------------------------------------------- clipboard


class ClipboardBridge:
    """Owns CLIPBOARD and PRIMARY on behalf of the viewer, and reports remote clipboard changes.

    It runs its own X connection on its own thread, because owning a selection means answering
    ``SelectionRequest`` events whenever another client pastes. ``on_change`` is called from that thread
    with the new CLIPBOARD text whenever a remote application copies.
    """

    def __init__(self, display: str, on_change: Callable[[str], None]) -> None:
        try:
            self._d = xdisplay.Display(display)
        except (DisplayError, OSError) as exc:
            raise InputUnavailable(f"cannot open X display {display!r}: {exc}") from exc
        if not self._d.has_extension("XFIXES"):
            self._d.close()
            raise InputUnavailable(f"X display {display!r} has no XFIXES extension (needed for clipboard)")
        self._on_change = on_change
        self._window = self._d.screen().root.create_window(0, 0, 1, 1, 0, X.CopyFromParent)
        self._atoms = {
            name: self._d.intern_atom(name)
            for name in (
                "CLIPBOARD",
                "TARGETS",
                "UTF8_STRING",
                "TEXT",
                "text/plain;charset=utf-8",
                "text/plain",
                "BROWSERVM_CLIP",
            )
        }
        self._d.xfixes_query_version()
        self._d.xfixes_select_selection_input(
            self._window, self._atoms["CLIPBOARD"], xfixes.XFixesSetSelectionOwnerNotifyMask
        )
        self._d.flush()
        self._text: bytes = b""
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clipboard", daemon=True)
        self._thread.start()

    def set_text(self, text: str) -> None:
        """Make ``text`` the remote CLIPBOARD and PRIMARY (thread-safe; applied on the bridge thread)."""
        if len(text.encode()) > MAX_CLIPBOARD_BYTES:
            log.debug(
                "clipboard text of %d bytes refused (limit %d)", len(text.encode()), MAX_CLIPBOARD_BYTES
            )
            return
        with self._lock:
            self._pending.append(text)
        os.write(self._wake_w, b"s")

    def close(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"q")
        self._thread.join(timeout=2)
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(Exception):
            self._d.close()

    def _run(self) -> None:
        try:
            while not self._stopping:
                while self._d.pending_events():
                    self._dispatch(self._d.next_event())
                readable, _, _ = select.select([self._d.fileno(), self._wake_r], [], [], 1.0)
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
                    self._apply_pending()
                if self._d.fileno() in readable and not self._d.pending_events():
                    # Reading the socket may deliver events; pending_events() triggers that read.
                    self._d.pending_events()
        except Exception:  # the X server went away: the streamer notices through its own connection
            log.exception("clipboard bridge stopped")

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        self._text = pending[-1].encode()
        for selection in (self._atoms["CLIPBOARD"], Xatom.PRIMARY):
            self._window.set_selection_owner(selection, X.CurrentTime)
        self._d.flush()

    def _dispatch(self, event: Any) -> None:
        # Match on classes: a SelectionNotify sent by another client has the send_event bit in its type.
        if isinstance(event, xevent.SelectionRequest):
            self._answer(event)
        elif isinstance(event, xevent.SelectionNotify):
            self._read_selection(event)
        elif type(event).__name__ == "SetSelectionOwnerNotify":
            # By name: python-xlib loads its extension modules a second time, so the class the event
            # arrives as is not ``xfixes.SetSelectionOwnerNotify``.
            owner = getattr(event.owner, "id", event.owner)
            if owner not in (X.NONE, self._window.id):
                self._window.convert_selection(
                    self._atoms["CLIPBOARD"],
                    self._atoms["UTF8_STRING"],
                    self._atoms["BROWSERVM_CLIP"],
                    X.CurrentTime,
                )
                self._d.flush()

    def _read_selection(self, event: Any) -> None:
        if event.property == X.NONE:
            return
        prop = self._window.get_full_property(event.property, X.AnyPropertyType, sizehint=MAX_CLIPBOARD_BYTES)
        self._window.delete_property(event.property)
        self._d.flush()
        if prop is None or prop.format != 8:
            return
        value = prop.value if isinstance(prop.value, bytes) else bytes(prop.value)
        self._on_change(value.decode("utf-8", errors="replace"))

    def _answer(self, event: Any) -> None:
        requestor = event.requestor
        prop = event.property if event.property != X.NONE else event.target
        text_targets = {
            self._atoms["UTF8_STRING"],
            self._atoms["TEXT"],
            self._atoms["text/plain;charset=utf-8"],
            self._atoms["text/plain"],
            Xatom.STRING,
        }
        if event.target == self._atoms["TARGETS"]:
            targets = [self._atoms["TARGETS"], *sorted(text_targets)]
            requestor.change_property(prop, Xatom.ATOM, 32, targets)
        elif event.target in text_targets:
            data = self._text
            if event.target == Xatom.STRING:
                data = self._text.decode().encode("latin-1", errors="replace")
            requestor.change_property(prop, event.target, 8, data)
        else:
            prop = X.NONE
        notify = xevent.SelectionNotify(
            time=event.time,
            requestor=requestor,
            selection=event.selection,
            target=event.target,
            property=prop,
        )
        requestor.send_event(notify)
        self._d.flush()


# ---------------------------------------------------------------------------------------------- dispatch


class InputHandler:
    """Turns data-channel messages into X input. ``handle`` returns the reply to send back, if any."""

    def __init__(self, xinput: XInput, clipboard: ClipboardBridge | None) -> None:
        self._x = xinput
        self._clipboard = clipboard

    def handle(self, raw: str | bytes) -> str | None:
        try:
            message = _INPUT.validate_json(raw)
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
        return None

    def release_all(self) -> None:
        with contextlib.suppress(Exception):
            self._x.release_all()
