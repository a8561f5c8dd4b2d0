"""XTEST injection and the clipboard bridge against a real Xvfb and a real Chromium page."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from Xlib import X
from Xlib import display as xdisplay

from browservm.guest.xinput import ClipboardBridge, InputHandler, XInput
from tests.guest.desktop_testbed import Chromium, Xvfb, write_page

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    server = Xvfb(1280, 720)
    yield server
    server.stop()


@pytest.fixture
async def page(xvfb: Xvfb, tmp_path: Path) -> AsyncIterator[Chromium]:
    chromium = Chromium(xvfb.display, write_page(tmp_path), xvfb.width, xvfb.height)
    try:
        await chromium.connect()
        yield chromium
    finally:
        await chromium.stop()


@pytest.fixture
def xinput(xvfb: Xvfb) -> Iterator[XInput]:
    injector = XInput(xvfb.display)
    yield injector
    injector.close()


async def test_click_and_type_reach_the_page(page: Chromium, xinput: XInput) -> None:
    bx, by = await page.center_of("btn")
    for _ in range(3):
        xinput.click(bx, by)
    await page.wait_for(lambda s: s["clicks"] == 3)

    ix, iy = await page.center_of("inp")
    xinput.click(ix, iy)
    await page.wait_for(lambda s: s["focused"] == "inp")
    xinput.type_text("Hello, World! 123 ~@#")
    await page.wait_for(lambda s: s["text"] == "Hello, World! 123 ~@#")

    # characters the US keymap lacks go through remapped spare keycodes
    xinput.type_text(" é€日本ß")
    await page.wait_for(lambda s: s["text"] == "Hello, World! 123 ~@# é€日本ß")


async def test_browser_key_events_select_all_and_delete(page: Chromium, xinput: XInput) -> None:
    handler = InputHandler(xinput, None)
    ix, iy = await page.center_of("inp")
    handler.handle(json.dumps({"t": "down", "button": 1, "x": ix, "y": iy}))
    handler.handle(json.dumps({"t": "up", "button": 1, "x": ix, "y": iy}))
    await page.wait_for(lambda s: s["focused"] == "inp")

    def key(key: str, code: str, down: bool) -> None:
        handler.handle(json.dumps({"t": "key", "key": key, "code": code, "down": down}))

    # shifted characters arrive as the browser sends them: Shift down, then the shifted key value
    key("Shift", "ShiftLeft", True)
    key("A", "KeyA", True)
    key("A", "KeyA", False)
    key("!", "Digit1", True)
    key("!", "Digit1", False)
    key("Shift", "ShiftLeft", False)
    key("b", "KeyB", True)
    key("b", "KeyB", False)
    await page.wait_for(lambda s: s["text"] == "A!b")

    key("Control", "ControlLeft", True)
    key("a", "KeyA", True)
    key("a", "KeyA", False)
    key("Control", "ControlLeft", False)
    key("Backspace", "Backspace", True)
    key("Backspace", "Backspace", False)
    await page.wait_for(lambda s: s["text"] == "")

    # malformed messages are ignored, coordinates are clamped, ping is answered
    for bad in ("not json", "{}", '{"t":"move"}', '{"t":"key","key":1}', "[1,2]", '{"t":"warp"}'):
        assert handler.handle(bad) is None
    assert handler.handle('{"t":"move","x":-50,"y":99999}') is None
    assert json.loads(handler.handle('{"t":"ping","ts":12.5}') or "") == {"t": "pong", "ts": 12.5}


async def test_clipboard_paste_and_remote_copy(page: Chromium, xvfb: Xvfb, xinput: XInput) -> None:
    loop = asyncio.get_running_loop()
    copied: asyncio.Queue[str] = asyncio.Queue()
    bridge = ClipboardBridge(xvfb.display, lambda text: loop.call_soon_threadsafe(copied.put_nowait, text))
    try:
        handler = InputHandler(xinput, bridge)
        handler.handle(json.dumps({"t": "clipboard", "text": "pasted ✓ text"}))
        ix, iy = await page.center_of("inp")
        xinput.click(ix, iy)
        await page.wait_for(lambda s: s["focused"] == "inp")
        # the bridge takes the selection on its own thread: wait until the X server names an owner
        probe = xdisplay.Display(xvfb.display)
        clipboard_atom = probe.intern_atom("CLIPBOARD")
        while probe.get_selection_owner(clipboard_atom) == X.NONE:
            await asyncio.sleep(0.01)
        probe.close()
        for name, down in (("Control", True), ("v", True), ("v", False), ("Control", False)):
            handler.handle(json.dumps({"t": "key", "key": name, "code": "", "down": down}))
        state = await page.wait_for(lambda s: s["text"] != "")
        assert state["text"] == "pasted ✓ text"

        # a remote application copies: the bridge reports the new text
        await page.evaluate(
            "document.getElementById('copy').value = 'from the remote'; "
            "document.getElementById('copy').focus(); document.getElementById('copy').select(); 0"
        )
        for name, down in (("Control", True), ("c", True), ("c", False), ("Control", False)):
            handler.handle(json.dumps({"t": "key", "key": name, "code": "", "down": down}))
        assert await asyncio.wait_for(copied.get(), 5) == "from the remote"
    finally:
        bridge.close()
    assert not any(t.name == "clipboard" for t in threading.enumerate())
