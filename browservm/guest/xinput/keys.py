"""From a browser's ``KeyboardEvent`` (``key``, ``code``) and from characters to X keysyms."""

from __future__ import annotations

from Xlib import XK

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
SHIFT_KEYSYMS = (XK.XK_Shift_L, XK.XK_Shift_R)


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
