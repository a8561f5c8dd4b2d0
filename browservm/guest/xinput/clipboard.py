"""The viewer's clipboard on the guest's display: owning CLIPBOARD and PRIMARY, and noticing remote copies."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from Xlib import X, Xatom
from Xlib.ext import xfixes
from Xlib.protocol import event as xevent

from browservm.guest.xinput.xtest import open_display

log = logging.getLogger(__name__)

MAX_CLIPBOARD_BYTES = 1 << 20
"""Clipboard text larger than this is refused (it would need the INCR protocol; nobody pastes 1 MiB)."""


class ClipboardBridge:
    """Owns CLIPBOARD and PRIMARY on behalf of the viewer, and reports remote clipboard changes.

    It runs its own X connection on its own thread, because owning a selection means answering
    ``SelectionRequest`` events whenever another client pastes. ``on_change`` is called from that thread
    with the new CLIPBOARD text whenever a remote application copies.
    """

    def __init__(self, display: str, on_change: Callable[[str], None]) -> None:
        self._d = open_display(display, "XFIXES", "the clipboard needs it")
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
