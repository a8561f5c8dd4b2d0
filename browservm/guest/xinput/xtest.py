"""Pointer and keyboard injection into one X display through XTEST."""

from __future__ import annotations

import contextlib
import logging

from Xlib import XK, X
from Xlib import display as xdisplay
from Xlib.error import DisplayError
from Xlib.ext import xtest

from browservm.guest.xinput.keys import SHIFT_KEYSYMS, keysym_for_char, keysym_for_key

log = logging.getLogger(__name__)

WHEEL_STEP_PX = 100.0
"""CSS pixels of ``WheelEvent`` delta per X wheel click (Chrome scrolls ~100 px per notch)."""


class InputUnavailable(Exception):
    """The X display cannot take injected input (no display, or no XTEST/XFixes extension)."""


def open_display(display: str, extension: str, fix: str) -> xdisplay.Display:
    """A connection to ``display`` that has ``extension``; :class:`InputUnavailable` saying ``fix`` if not."""
    try:
        connection = xdisplay.Display(display)
    except (DisplayError, OSError) as exc:
        raise InputUnavailable(f"cannot open X display {display!r}: {exc}; is Xvfb running?") from exc
    if not connection.has_extension(extension):
        connection.close()
        raise InputUnavailable(f"X display {display!r} has no {extension} extension; {fix}")
    return connection


class XInput:
    """Pointer and keyboard injection into one X display through XTEST.

    Not thread-safe: use it from one thread (the streamer's event loop). Each call flushes, so the events
    reach the server at once without a round trip.
    """

    def __init__(self, display: str) -> None:
        self._d = open_display(display, "XTEST", "start Xvfb with +extension XTEST")
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
        shifts = {self._d.keysym_to_keycode(keysym) for keysym in SHIFT_KEYSYMS}
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
