"""The WebRTC end-to-end scenario, run inside a network namespace that holds only loopback.

:mod:`tests.web.test_webrtc_e2e` creates the namespace and runs this as::

    ip netns exec NS .venv/bin/python -m tests.web.netns_driver --state-dir DIR --out results.json

Everything it starts lives in that namespace: a real controller (uvicorn in this process, the process
sandbox backend, SQLite), the sandbox's agent, Xvfb, Chromium and the real streamer, and the user's
headless Chromium (Playwright). The streamer gathers on 127.0.0.1 only (``ice_host_addresses``), so no
packet can go anywhere but loopback.

One ``demo`` session carries every step, in the order a user would meet them:

1. ``video``: the viewer gets WebRTC video (not the noVNC fallback) that shows the sign-in page, and the
   stats overlay says ``direct``.
2. ``input``: a click on the email field and typed text in the viewer reach the sandbox's page.
3. ``whep``: a second viewer page with ``?transport=whep`` gets video too.
4. ``recovery``: the streamer process is killed; the supervisor restarts it and the first viewer page
   streams again without a reload.
5. ``signin``: the user clicks the password field, types ``demo`` and clicks *Sign in*; the session
   completes with the typed email.

Results are JSON, written after every step (so a crash leaves what was measured): one object per step,
plus ``error`` (what failed, with the viewer's log and the sandbox's service logs) when a step failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
from playwright.async_api import BrowserContext, Page, async_playwright

from tests.controller.conftest import Controller, controller_settings, run_controller
from tests.controller.demo_login import cdp_page, evaluate
from tests.web.conftest import CHROMIUM, FLAGS

EMAIL = "netns-e2e@example.test"
STREAMER_MODULE = "browservm.guest.streamer"

# Installed before the viewer's scripts run: marks when the offer leaves the page (WebSocket or WHEP
# POST) and when the viewer first reports streaming, on the page's own clock.
TIMING_SCRIPT = """
window.__bvm = { offerAt: null, streamingAt: [] };
const wsSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (window.__bvm.offerAt === null && typeof data === "string" && data.includes('"offer"')) {
    window.__bvm.offerAt = performance.now();
  }
  return wsSend.call(this, data);
};
const originalFetch = window.fetch;
window.fetch = function (resource, init) {
  if (window.__bvm.offerAt === null && init && init.method === "POST" && String(resource).endsWith("/whep")) {
    window.__bvm.offerAt = performance.now();
  }
  return originalFetch.call(this, resource, init);
};
window.addEventListener("browservm-state", (event) => {
  if (event.detail.state === "streaming") window.__bvm.streamingAt.push(performance.now());
}, true);
"""

# The current video frame's pixels at a point inside the sign-in card (white) and at a corner (the page's
# #f4f5f7 background), read off the <video> through a canvas.
VIDEO_PIXELS = """([cardX, cardY]) => {
  const video = document.querySelector(".bvm-viewer video");
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const g = canvas.getContext("2d");
  g.drawImage(video, 0, 0);
  const px = (x, y) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3));
  return { card: px(cardX, cardY), corner: px(5, 5),
           width: canvas.width, height: canvas.height };
}"""

SELECTED_PAIR = """async () => {
  const pc = window.browservmViewer && window.browservmViewer.pc;
  if (!pc) return null;
  const stats = await pc.getStats();
  let transport = null;
  stats.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) transport = s; });
  if (!transport) return null;
  const pair = stats.get(transport.selectedCandidatePairId);
  const local = stats.get(pair.localCandidateId), remote = stats.get(pair.remoteCandidateId);
  const side = (c) => ({ address: c.address, port: c.port, type: c.candidateType, protocol: c.protocol });
  return { state: pair.state, local: side(local), remote: side(remote) };
}"""

# Where an element of the sandbox's page is on the remote screen (the kiosk window's content area).
REMOTE_RECT = """(selector) => {
  const r = document.querySelector(selector).getBoundingClientRect();
  const top = window.screenY + (window.outerHeight - window.innerHeight);
  const left = window.screenX + r.left;
  return { x: left + r.width / 2, y: top + r.top + r.height / 2, left: left, top: top + r.top };
}"""


class Results:
    """The JSON the outer test reads, rewritten after every step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps_done": []}

    def record(self, step: str, value: dict[str, Any]) -> None:
        self.data[step] = value
        self.data["steps_done"].append(step)
        self.write()

    def write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        temporary.replace(self.path)


# ---------------------------------------------------------------------------------------------- viewer


async def viewer_status(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(
        "() => window.browservmViewer ? JSON.parse(JSON.stringify(window.browservmViewer.status)) : {}"
    )
    return value


async def wait_for(page: Page, what: str, check: Any, timeout_s: float) -> dict[str, Any]:
    """Poll the viewer's status until ``check(status)`` holds; fail with the viewer's log otherwise."""
    status: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while not check(status := await viewer_status(page)):
                await asyncio.sleep(0.05)
    except TimeoutError:
        log = "\n".join(status.get("log", [])[-25:])
        raise AssertionError(f"viewer: {what} not within {timeout_s:.0f} s; status {status}\n{log}") from None
    return status


def near(colour: list[int], expected: tuple[int, int, int], tolerance: int = 10) -> bool:
    """Within the tolerance of lossy video (H.264 moves flat colours by a few levels)."""
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


async def wait_form_on_video(page: Page, remote_page: str, timeout_s: float) -> dict[str, Any]:
    """Wait until the video shows the sign-in card (white, in its left padding) on the grey page."""
    form = await remote_rect(remote_page, "form")
    card = [round(form["left"] + 16), round(form["y"])]
    pixels: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                pixels = await page.evaluate(VIDEO_PIXELS, card)
                if (
                    pixels
                    and near(pixels["card"], (255, 255, 255))
                    and near(pixels["corner"], (244, 245, 247))
                ):
                    return pixels
                await asyncio.sleep(0.1)
    except TimeoutError:
        await page.screenshot(path="/tmp/bvm-netns-e2e-failure.png")
        raise AssertionError(
            f"the video never showed the sign-in form within {timeout_s:.0f} s; last pixels {pixels} "
            "(screenshot: /tmp/bvm-netns-e2e-failure.png)"
        ) from None


async def open_viewer(context: BrowserContext, url: str, pages: list[Page]) -> tuple[Page, dict[str, Any]]:
    """Open the viewer; return the page and when its first WebRTC frame came (ms)."""
    page = await context.new_page()
    pages.append(page)
    await page.add_init_script(TIMING_SCRIPT)
    started = time.monotonic()
    await page.goto(url)
    await wait_for(page, "WebRTC streaming", lambda s: s.get("state") == "streaming", 20)
    goto_ms = (time.monotonic() - started) * 1000
    marks: dict[str, Any] = await page.evaluate(
        "() => ({ offerAt: window.__bvm.offerAt, streamingAt: window.__bvm.streamingAt[0] })"
    )
    timing = {
        "goto_to_first_frame_ms": round(goto_ms),
        "navigation_start_to_first_frame_ms": round(marks["streamingAt"]),
        "offer_to_first_frame_ms": round(marks["streamingAt"] - marks["offerAt"]),
    }
    return page, timing


def viewer_point(
    box: dict[str, float], remote: tuple[int, int], point: dict[str, float]
) -> tuple[float, float]:
    """Where a remote screen pixel shows in the viewer's <video> (object-fit: contain letterboxing)."""
    scale = min(box["width"] / remote[0], box["height"] / remote[1])
    left = box["x"] + (box["width"] - remote[0] * scale) / 2
    top = box["y"] + (box["height"] - remote[1] * scale) / 2
    return left + point["x"] * scale, top + point["y"] * scale


async def remote_rect(remote_page: str, selector: str) -> dict[str, float]:
    reply = await evaluate(remote_page, f"JSON.stringify(({REMOTE_RECT})({json.dumps(selector)}))")
    rect: dict[str, float] = json.loads(reply["result"]["value"])
    return rect


async def click_remote(page: Page, remote_page: str, selector: str) -> None:
    """Click, in the viewer, where ``selector`` shows on the remote screen."""
    point = await remote_rect(remote_page, selector)
    video = page.locator(".bvm-viewer video")
    box = await video.bounding_box()
    status = await viewer_status(page)
    assert box is not None, "the viewer has no video element on screen"
    x, y = viewer_point(dict(box), (status["remoteWidth"], status["remoteHeight"]), point)
    await page.mouse.click(x, y)


async def remote_value(remote_page: str, expression: str) -> Any:
    return (await evaluate(remote_page, expression))["result"].get("value")


async def wait_remote(remote_page: str, expression: str, expected: Any, timeout_s: float) -> float:
    """Wait until ``expression`` in the sandbox's page equals ``expected``; return how long it took (ms)."""
    started = time.monotonic()
    value = None
    try:
        async with asyncio.timeout(timeout_s):
            while (value := await remote_value(remote_page, expression)) != expected:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"sandbox page: {expression} is {value!r}, not {expected!r}") from None
    return (time.monotonic() - started) * 1000


# ---------------------------------------------------------------------------------------------- sandbox


def sandbox_dir(controller: Controller) -> Path:
    (found,) = [d for d in (controller.settings.state_dir / "sandboxes").iterdir() if (d / "run").is_dir()]
    return found


def streamer_process(directory: Path) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if STREAMER_MODULE in (process.info["cmdline"] or []) and process.environ().get(
                "BROWSERVM_SANDBOX_DIR"
            ) == str(directory):
                return process
    return None


def service_logs(controller: Controller) -> dict[str, str]:
    tails: dict[str, str] = {}
    with contextlib.suppress(Exception):
        for log_file in sorted(sandbox_dir(controller).glob("run/*.log")):
            tails[log_file.name] = log_file.read_text(errors="replace")[-3000:]
    return tails


# ---------------------------------------------------------------------------------------------- steps


async def run(state_dir: Path, results: Results) -> None:
    settings = controller_settings(
        state_dir,
        f"sqlite+aiosqlite:///{state_dir / 'browservm.db'}",
        state_dir=state_dir,
        ice_host_addresses=["127.0.0.1"],
        session_ttl_s=300,
    )
    async with contextlib.asynccontextmanager(run_controller)(settings) as controller:
        profile = Path(tempfile.mkdtemp(prefix="bvm-netns-viewer-"))
        pages: list[Page] = []
        try:
            async with async_playwright() as playwright:
                context = await playwright.chromium.launch_persistent_context(
                    str(profile),
                    executable_path=CHROMIUM,
                    headless=True,
                    args=FLAGS,
                    viewport={"width": 800, "height": 700},
                )
                try:
                    await steps(controller, context, results, pages)
                except BaseException as exc:
                    status: dict[str, Any] = {}
                    with contextlib.suppress(Exception):
                        status = await viewer_status(pages[0])
                    results.data["error"] = {
                        "message": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "viewer_log": status.get("log", []),
                        "service_logs": service_logs(controller),
                    }
                    results.write()
                    raise
                finally:
                    await context.close()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


async def steps(controller: Controller, context: BrowserContext, results: Results, pages: list[Page]) -> None:
    """The five steps of the module docstring; ``pages`` gets the viewer pages as they open."""
    created = (
        await controller.client.post("/v1/sessions", json={"user_id": "netns-e2e", "provider": "demo"})
    ).json()
    session_id = created["id"]
    started = time.monotonic()
    waiting = await controller.wait_status(session_id, "awaiting_user", "failed", timeout_s=60)
    assert waiting["status"] == "awaiting_user", waiting
    awaiting_ms = (time.monotonic() - started) * 1000
    sandbox = sandbox_dir(controller)
    remote_page = await cdp_page(sandbox / "run" / "chromium-profile", "/demo/oauth/authorize")

    # 1. WebRTC video of the sign-in page, on a direct path.
    page, timing = await open_viewer(context, created["viewer_url"], pages)
    shown = time.monotonic()
    pixels = await wait_form_on_video(page, remote_page, 10)
    form_after_first_frame_ms = (time.monotonic() - shown) * 1000
    status = await wait_for(page, "stats", lambda s: s.get("stats", {}).get("path"), 5)
    results.record(
        "video",
        {
            "mode": status["mode"],
            "state": status["state"],
            "remote_size": [status["remoteWidth"], status["remoteHeight"]],
            "stats": status["stats"],
            "overlay": await page.locator(".bvm-stats").text_content(),
            "selected_pair": await page.evaluate(SELECTED_PAIR),
            "pixels": pixels,
            "form_after_first_frame_ms": round(form_after_first_frame_ms),
            "create_to_awaiting_user_ms": round(awaiting_ms),
            **timing,
        },
    )

    # 2. A click on the email field and typing, through the data channel, into the sandbox's page.
    await click_remote(page, remote_page, "#email")
    focus_ms = await wait_remote(
        remote_page, "document.activeElement && document.activeElement.id", "email", 5
    )
    await page.keyboard.type(EMAIL)
    last_key_ms = await wait_remote(remote_page, "document.querySelector('#email').value", EMAIL, 10)
    results.record(
        "input",
        {
            "focused": "email",
            "click_to_focus_ms": round(focus_ms),
            "email_value": await remote_value(remote_page, "document.querySelector('#email').value"),
            "last_key_to_value_ms": round(last_key_ms),
        },
    )

    # 3. WHEP: a second viewer of the same session.
    whep_page, whep_timing = await open_viewer(context, created["viewer_url"] + "&transport=whep", pages)
    whep_pixels = await wait_form_on_video(whep_page, remote_page, 10)
    whep_status = await viewer_status(whep_page)
    results.record(
        "whep",
        {
            "mode": whep_status["mode"],
            "state": whep_status["state"],
            "frames": whep_status["frames"],
            "pixels": whep_pixels,
            "selected_pair": await whep_page.evaluate(SELECTED_PAIR),
            **whep_timing,
        },
    )
    await whep_page.close()

    # 4. The streamer dies; the supervisor restarts it and the open viewer streams again, same page.
    await page.evaluate("() => { window.__bvmSamePage = true; }")
    before = await viewer_status(page)
    streamer = streamer_process(sandbox)
    assert streamer is not None, "no streamer process found for the sandbox"
    killed_at = time.monotonic()
    streamer.send_signal(signal.SIGKILL)
    recovered = await wait_for(
        page,
        "streaming again after the streamer was killed",
        lambda s: (
            s.get("reconnects", 0) > before["reconnects"]
            and s.get("state") == "streaming"
            and s.get("frames", 0) >= 10
        ),
        45,
    )
    recovery_ms = (time.monotonic() - killed_at) * 1000
    restarted = streamer_process(sandbox)
    results.record(
        "recovery",
        {
            "killed_pid": streamer.pid,
            "new_pid": restarted.pid if restarted else None,
            "mode": recovered["mode"],
            "state": recovered["state"],
            "frames": recovered["frames"],
            "reconnects": recovered["reconnects"],
            "same_page": await page.evaluate("() => window.__bvmSamePage === true"),
            "kill_to_frames_ms": round(recovery_ms),
            "viewer_log": recovered["log"][-15:],
        },
    )

    # 5. Sign in through the viewer: click the password field, type, click "Sign in".
    await click_remote(page, remote_page, "#password")
    await wait_remote(remote_page, "document.activeElement && document.activeElement.id", "password", 5)
    await page.keyboard.type("demo")
    await wait_remote(remote_page, "document.querySelector('#password').value.length", 4, 10)
    await click_remote(page, remote_page, "button[type=submit]")
    done = await controller.wait_status(session_id, "completed", "failed", timeout_s=30)
    results.record(
        "signin",
        {"status": done["status"], "reason": done.get("reason"), "account": done.get("account")},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="short, empty: holds unix sockets")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(run(args.state_dir, Results(args.out)))


if __name__ == "__main__":
    main()
