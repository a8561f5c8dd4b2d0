"""The guest's screen follows the viewer's size: RandR on Xvfb, and the kiosk browser's window with it.

Xvfb allocates its framebuffer once, at the ``-screen`` size it starts with, and RandR (1.5 in Xvfb 21)
can then set any screen size up to that one. So the display starts at the largest size allowed and is
set to the viewer's size, clamped to the configured bounds, whenever the viewer asks. With no window
manager nothing resizes the browser's window for it, so the top-level windows are resized to fill the
new screen here (Chromium lays its page out again at once; checked with Chromium 156: ``innerWidth``
follows within a frame).

Sizes are even (H.264's 4:2:0 chroma needs it). The capture must be restarted at the new size by its
owner (the streamer), and x11vnc notices by itself with ``-xrandr``.
"""

from __future__ import annotations

from dataclasses import dataclass

from Xlib import X
from Xlib import display as xdisplay
from Xlib.ext import randr

MM_PER_INCH = 25.4
DPI = 96


@dataclass(frozen=True, slots=True)
class ScreenBounds:
    """The sizes a viewer may ask for; the display is started at the largest."""

    min_width: int
    min_height: int
    max_width: int
    max_height: int

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """``width`` x ``height`` clamped into the bounds and made even."""
        w = max(self.min_width, min(self.max_width, int(width)))
        h = max(self.min_height, min(self.max_height, int(height)))
        return w - w % 2, h - h % 2


class ScreenSizer:
    """Sets the size of one X display's screen (RandR) and of its top-level windows."""

    def __init__(self, display: str) -> None:
        self._d = xdisplay.Display(display)
        if not self._d.has_extension("RANDR"):
            self._d.close()
            raise RuntimeError(
                f"X display {display} has no RandR extension: the screen cannot follow viewers"
            )
        # The modes this connection creates belong to it, and the X server drops them (and the screen
        # goes back to its first size) when it closes: keep them for the display's life instead.
        self._d.set_close_down_mode(X.RetainPermanent)
        self._root = self._d.screen().root

    def size(self) -> tuple[int, int]:
        geometry = self._root.get_geometry()
        return int(geometry.width), int(geometry.height)

    def largest(self) -> tuple[int, int]:
        """The largest screen this display can have (the size Xvfb was started with)."""
        limits = randr.get_screen_size_range(self._root)
        return int(limits.max_width), int(limits.max_height)

    def resize(self, width: int, height: int) -> tuple[int, int]:
        """Make the screen ``width`` x ``height`` (within what the display allows) and every visible
        top-level window fill it. Returns the size set."""
        max_width, max_height = self.largest()
        width, height = min(width, max_width), min(height, max_height)
        if (width, height) != self.size():
            self._set_mode(width, height)
        for window in self._root.query_tree().children:
            if window.get_attributes().map_state != X.IsViewable:
                continue
            geometry = window.get_geometry()
            if (geometry.x, geometry.y, geometry.width, geometry.height) != (0, 0, width, height):
                window.configure(x=0, y=0, width=width, height=height)
        self._d.sync()
        return self.size()

    def _set_mode(self, width: int, height: int) -> None:
        resources = randr.get_screen_resources(self._root)
        output, crtc = resources.outputs[0], resources.crtcs[0]
        mode = next((m.id for m in resources.modes if (m.width, m.height) == (width, height)), None)
        if mode is None:
            name = f"{width}x{height}"
            info = {
                "id": 0,
                "width": width,
                "height": height,
                "dot_clock": width * height * 60,
                "h_sync_start": width,
                "h_sync_end": width,
                "h_total": width,
                "h_skew": 0,
                "v_sync_start": height,
                "v_sync_end": height,
                "v_total": height,
                "name_length": len(name),
                "flags": 0,
            }
            mode = randr.create_mode(self._root, info, name).mode
            randr.add_output_mode(self._d, output, mode)
        # The CRTC must always fit in the screen: switch it off, size the screen, switch it on again.
        stamp = randr.get_screen_resources(self._root).config_timestamp
        randr.set_crtc_config(self._d, crtc, stamp, 0, 0, 0, randr.Rotate_0, [])
        randr.set_screen_size(
            self._root, width, height, round(width * MM_PER_INCH / DPI), round(height * MM_PER_INCH / DPI)
        )
        stamp = randr.get_screen_resources(self._root).config_timestamp
        randr.set_crtc_config(self._d, crtc, stamp, 0, 0, mode, randr.Rotate_0, [output])

    def close(self) -> None:
        self._d.close()
