"""A real desktop for the streamer, capture and input tests: Xvfb plus a kiosk Chromium on a local page,
read over DevTools. Every start has a matching stop; nothing here waits on a sleep for readiness."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets.asyncio.client

from browservm.guest.display import MANDATORY_CHROMIUM_FLAGS

CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if shutil.which(p)), "chromium"
)
MANDATORY_FLAGS = list(MANDATORY_CHROMIUM_FLAGS)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>
 html, body { margin: 0; background: #203040; color: white; font: 20px sans-serif; }
 #btn { position: absolute; left: 100px; top: 100px; width: 200px; height: 80px; font-size: 24px; }
 #inp { position: absolute; left: 100px; top: 250px; width: 500px; height: 40px; font-size: 24px; }
 #copy { position: absolute; left: 100px; top: 350px; width: 500px; height: 40px; }
 #swatch { position: absolute; left: 700px; top: 100px; width: 200px; height: 200px; background: #000; }
</style></head><body>
<button id="btn">click me</button>
<input id="inp" autocomplete="off">
<input id="copy" value="">
<div id="swatch"></div>
<script>
 let clicks = 0;
 const btn = document.getElementById('btn');
 btn.addEventListener('click', () => {
   clicks++;
   // a click is visible in the video: the swatch turns white
   document.getElementById('swatch').style.background = '#fff';
 });
 window.getState = () => JSON.stringify({
   clicks, text: document.getElementById('inp').value, focused: document.activeElement && document.activeElement.id,
 });
 window.rectOf = (id) => {
   const r = document.getElementById(id).getBoundingClientRect();
   const dx = window.screenX + (window.outerWidth - window.innerWidth);
   const dy = window.screenY + (window.outerHeight - window.innerHeight);
   return JSON.stringify({x: Math.round(r.left + r.width / 2 + dx), y: Math.round(r.top + r.height / 2 + dy)});
 };
</script></body></html>
"""


class Xvfb:
    def __init__(self, width: int = 1280, height: int = 720) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [
                "Xvfb",
                "-displayfd",
                str(write_fd),
                "-screen",
                "0",
                f"{width}x{height}x24",
                "-nolisten",
                "tcp",
                "+extension",
                "XTEST",
                "-noreset",
            ],
            pass_fds=[write_fd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_fd)
        try:
            number = b""
            while not number.endswith(b"\n"):  # Xvfb writes the number once it accepts clients
                chunk = os.read(read_fd, 16)
                if not chunk:
                    raise RuntimeError(f"Xvfb exited with {self.proc.wait()} before accepting clients")
                number += chunk
        finally:
            os.close(read_fd)
        self.display = f":{number.decode().strip()}"
        self.width, self.height = width, height

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Chromium:
    """A kiosk Chromium showing a page; ``evaluate`` runs JavaScript in it over DevTools."""

    def __init__(self, display: str, url: str, width: int, height: int, extra_flags: list[str] | None = None):
        self.profile = tempfile.mkdtemp(prefix="bvm-chromium-")
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *MANDATORY_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "--kiosk",
                "--window-position=0,0",
                f"--window-size={width},{height}",
                "--password-store=basic",
                "--disable-features=Translate",
                "--noerrdialogs",
                *(extra_flags or []),
                url,
            ],
            env={**os.environ, "DISPLAY": display},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        self._ws: Any = None

    async def connect(self, timeout: float = 20.0) -> None:
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Chromium exited with {self.proc.returncode}")
                if port_file.exists() and port_file.read_text().count("\n") >= 1:
                    port = int(port_file.read_text().splitlines()[0])
                    with contextlib.suppress(httpx.HTTPError):
                        targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                        pages = [t for t in targets if t["type"] == "page"]
                        if pages:
                            self._ws = await websockets.asyncio.client.connect(
                                pages[0]["webSocketDebuggerUrl"], max_size=None
                            )
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError("Chromium's DevTools did not answer")
                await asyncio.sleep(0.05)
        # the page must have loaded its script and painted (rAF runs once the window is mapped and drawn)
        while await self.evaluate("typeof window.getState") != "function":
            if time.monotonic() > deadline:
                raise TimeoutError("test page did not load")
            await asyncio.sleep(0.05)
        await self.call(
            "Runtime.evaluate",
            expression="new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))",
            awaitPromise=True,
        )

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._ws.recv())
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(await self.evaluate("getState()"))
        return state

    async def center_of(self, element_id: str) -> tuple[int, int]:
        rect = json.loads(await self.evaluate(f"rectOf({element_id!r})"))
        return rect["x"], rect["y"]

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state()
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"page state never matched; last {state}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Chromium's helper processes may still write into the profile for a moment after the browser
        # exits; remove until it stays gone.
        for _ in range(20):
            shutil.rmtree(self.profile, ignore_errors=True)
            if not os.path.exists(self.profile):
                break
            await asyncio.sleep(0.05)


def write_page(directory: Path, html: str = PAGE) -> str:
    path = directory / "page.html"
    path.write_text(html)
    return path.as_uri()
