"""The WebRTC end-to-end scenario, run inside a network namespace that holds only loopback.

:mod:`tests.web.test_webrtc_e2e` creates the namespace and runs this as::

    ip netns exec NS .venv/bin/python -m tests.web.netns_driver --state-dir DIR --out results.json

Everything it starts lives in that namespace: a real controller (uvicorn in this process, the process
sandbox backend, SQLite), the sandbox's agent, Xvfb, Chromium and the real streamer, and the user's
headless Chromium (Playwright), and a coturn. The sandbox has a network namespace of its own, as every
sandbox does, from which it may reach only that coturn (at its gateway): the media is relayed, and no
packet leaves the test's namespace.

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
import secrets
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from playwright.async_api import BrowserContext, FloatRect, Page

from browservm.settings import Settings
from tests.controller.conftest import Controller, free_port, free_subnet, run_controller
from tests.controller.demo_login import RemotePage, cdp_page, evaluate
from tests.support.netns import in_netns, netns_of_dir
from tests.web.conftest import viewer_browser

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


FOCUSED = "document.activeElement && document.activeElement.id"
LOST_MARKS = ("peer connection disconnected", "peer connection failed", "state reconnecting")
"""Viewer log lines that say the media path was lost."""


def log_since(status: dict[str, Any], iso: str) -> list[str]:
    """The viewer's log lines stamped after ``iso`` (its lines start with an ISO time of the page's clock)."""
    return [line for line in status.get("log", []) if line.split(" ", 1)[0] > iso]


async def wait_for(
    page: Page, what: str, check: Callable[[dict[str, Any]], Any], timeout_s: float
) -> dict[str, Any]:
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


def screen_follows(status: dict[str, Any]) -> bool:
    wanted = status.get("requestedSize")
    return bool(wanted) and (status.get("remoteWidth"), status.get("remoteHeight")) == (
        wanted["width"],
        wanted["height"],
    )


async def wait_form_on_video(page: Page, remote_page: RemotePage, timeout_s: float) -> dict[str, Any]:
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


def viewer_point(box: FloatRect, remote: tuple[int, int], point: dict[str, float]) -> tuple[float, float]:
    """Where a remote screen pixel shows in the viewer's <video> (object-fit: contain letterboxing)."""
    scale = min(box["width"] / remote[0], box["height"] / remote[1])
    left = box["x"] + (box["width"] - remote[0] * scale) / 2
    top = box["y"] + (box["height"] - remote[1] * scale) / 2
    return left + point["x"] * scale, top + point["y"] * scale


async def remote_rect(remote_page: RemotePage, selector: str) -> dict[str, float]:
    reply = await evaluate(remote_page, f"JSON.stringify(({REMOTE_RECT})({json.dumps(selector)}))")
    rect: dict[str, float] = json.loads(reply["result"]["value"])
    return rect


async def click_remote(page: Page, remote_page: RemotePage, selector: str) -> None:
    """Click, in the viewer, where ``selector`` shows on the remote screen."""
    point = await remote_rect(remote_page, selector)
    video = page.locator(".bvm-viewer video")
    box = await video.bounding_box()
    status = await viewer_status(page)
    assert box is not None, "the viewer has no video element on screen"
    x, y = viewer_point(box, (status["remoteWidth"], status["remoteHeight"]), point)
    await page.mouse.click(x, y)


async def remote_value(remote_page: RemotePage, expression: str) -> Any:
    return (await evaluate(remote_page, expression))["result"].get("value")


async def wait_remote(remote_page: RemotePage, expression: str, expected: Any, timeout_s: float) -> float:
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


async def wait_warm(controller: Controller, timeout_s: float = 60) -> None:
    """Until the warm pool has a sandbox ready (its gauge in /metrics)."""
    async with asyncio.timeout(timeout_s):
        while "browservm_warm_pool_idle 1.0" not in await controller.api.metrics():
            await asyncio.sleep(0.1)


def sandbox_dir(controller: Controller, sandbox_id: str) -> Path:
    return controller.settings.state_dir / "sandboxes" / sandbox_id


def streamer_process(directory: Path) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if STREAMER_MODULE in (process.info["cmdline"] or []) and process.environ().get(
                "BROWSERVM_SANDBOX_DIR"
            ) == str(directory):
                return process
    return None


async def shown_page(profile: Path) -> dict[str, Any]:
    """The URL and ``document.readyState`` of the sandbox Chromium's page, right now."""
    port = int((profile / "DevToolsActivePort").read_text().split()[0])
    netns = netns_of_dir(profile)

    async def targets() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            found: list[dict[str, Any]] = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
            return found

    (target,) = [t for t in await in_netns(netns, targets) if t.get("type") == "page"]
    reply = await evaluate(RemotePage(netns, target["webSocketDebuggerUrl"]), "document.readyState")
    return {"url": target["url"], "ready_state": reply["result"].get("value")}


def service_logs(sandbox: Path) -> dict[str, str]:
    tails: dict[str, str] = {}
    with contextlib.suppress(Exception):
        for log_file in sorted([*sandbox.glob("run/*.log"), *sandbox.glob("run/logs/*.log")]):
            tails[log_file.name] = log_file.read_text(errors="replace")[-3000:]
    return tails


# ---------------------------------------------------------------------------------------------- steps


async def run(state_dir: Path, results: Results) -> None:
    # Built here, not with controller_settings: that one makes a state directory of its own.
    turn_port = free_port()
    settings = Settings(
        state_dir=state_dir,
        database_url=f"sqlite+aiosqlite:///{state_dir / 'browservm.db'}",
        host="127.0.0.1",
        port=free_port(),
        max_sandboxes=2,
        warm_pool_size=1,  # the session takes a warm sandbox, as on a production host
        devtools_debug_port=True,  # to check what the viewer's input did to the remote page
        session_ttl_s=300,
        reconcile_interval_s=1,
        log_json=False,
        log_level="warning",
        sandbox_subnet=free_subnet(),
        demo_oauth_port=free_port(),
        guest_dns=[],
        # A guest reaches nothing but its host's coturn (at its gateway): media is relayed through it.
        run_coturn=True,
        turn_secret=secrets.token_urlsafe(16),
        turn_urls=[f"turn:127.0.0.1:{turn_port}?transport=udp", f"turn:127.0.0.1:{turn_port}?transport=tcp"],
    )
    async with run_controller(settings) as controller:
        # Inside the state directory, which the outer test removes even if this process is killed.
        profile = state_dir / "viewer-profile"
        pages: list[Page] = []
        try:
            async with viewer_browser(profile) as context:
                scenario = Scenario(controller, context, results, pages)
                try:
                    await steps(scenario)
                except BaseException as exc:
                    status: dict[str, Any] = {}
                    with contextlib.suppress(Exception):
                        status = await viewer_status(pages[0])
                    results.data["error"] = {
                        "message": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "viewer_log": status.get("log", []),
                        "service_logs": service_logs(scenario.sandbox),
                    }
                    results.write()
                    raise
        finally:
            shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Scenario:
    """What the steps share: one ``demo`` session, its sandbox, and the user's first viewer page."""

    controller: Controller
    context: BrowserContext
    results: Results
    pages: list[Page]
    session_id: str = ""
    viewer_url: str = ""
    sandbox: Path = Path()
    remote_page: RemotePage = ""
    """The DevTools WebSocket of the sandbox Chromium's sign-in page (to check what input did)."""

    @property
    def page(self) -> Page:
        return self.pages[0]


async def steps(scenario: Scenario) -> None:
    """The five steps of the module docstring, in order; each records its results."""
    session = await start_session(scenario)
    await video_step(scenario, session)
    await input_step(scenario)
    await whep_step(scenario)
    await recovery_step(scenario)
    await signin_step(scenario)


async def start_session(scenario: Scenario) -> dict[str, Any]:
    await wait_warm(scenario.controller)
    created = await scenario.controller.api.sessions.create(user_id="netns-e2e", provider="demo")
    # Relay only, as for any viewer off this host: here the viewer shares the host's namespace and could
    # reach the guest's own address, which no remote viewer can.
    scenario.session_id, scenario.viewer_url = created.id, created.viewer_url + "&ice_policy=relay"
    started = time.monotonic()
    waiting = await scenario.controller.wait_status(
        scenario.session_id, "awaiting_user", "failed", timeout_s=60
    )
    assert waiting["status"] == "awaiting_user", waiting
    awaiting_ms = (time.monotonic() - started) * 1000
    scenario.sandbox = sandbox_dir(scenario.controller, waiting["sandbox_id"])
    profile = scenario.sandbox / "run" / "chromium-profile"
    # awaiting_user means the user can sign in now: the page must be loaded, not merely requested.
    at_awaiting_user = await shown_page(profile)
    scenario.remote_page = await cdp_page(profile, "/demo/oauth/authorize")
    metrics = await scenario.controller.api.metrics()
    return {
        "create_to_awaiting_user_ms": round(awaiting_ms),
        "page_at_awaiting_user": at_awaiting_user,
        "warm_sandbox": 'browservm_warm_pool_takes_total{result="hit"} 1.0' in metrics,
    }


async def video_step(scenario: Scenario, session: dict[str, Any]) -> None:
    """WebRTC video of the sign-in page, relayed by the host's coturn (the only path a guest may use)."""
    page, timing = await open_viewer(scenario.context, scenario.viewer_url, scenario.pages)
    shown = time.monotonic()
    # The remote screen follows the viewer's area: the video comes at the size the viewer asked for.
    followed = await wait_for(page, "the remote screen at the viewer's size", screen_follows, 20)
    followed_ms = (time.monotonic() - shown) * 1000
    pixels = await wait_form_on_video(page, scenario.remote_page, 10)
    form_after_first_frame_ms = (time.monotonic() - shown) * 1000
    status = await wait_for(page, "stats", lambda s: s.get("stats", {}).get("path"), 5)
    scenario.results.record(
        "video",
        {
            "mode": status["mode"],
            "state": status["state"],
            "fallback_reason": status["fallbackReason"],
            "remote_size": [status["remoteWidth"], status["remoteHeight"]],
            "requested_size": [followed["requestedSize"]["width"], followed["requestedSize"]["height"]],
            "screen_followed_ms": round(followed_ms),
            "stats": status["stats"],
            "overlay": await page.locator(".bvm-stats").text_content(),
            "selected_pair": await page.evaluate(SELECTED_PAIR),
            "pixels": pixels,
            "form_after_first_frame_ms": round(form_after_first_frame_ms),
            **session,
            **timing,
        },
    )


async def input_step(scenario: Scenario) -> None:
    """A click on the email field and typing, through the data channel, into the sandbox's page."""
    page, remote_page = scenario.page, scenario.remote_page
    await click_remote(page, remote_page, "#email")
    focus_ms = await wait_remote(remote_page, FOCUSED, "email", 5)
    await page.keyboard.type(EMAIL)
    last_key_ms = await wait_remote(remote_page, "document.querySelector('#email').value", EMAIL, 10)
    scenario.results.record(
        "input",
        {
            "focused": await remote_value(remote_page, FOCUSED),
            "click_to_focus_ms": round(focus_ms),
            "email_value": await remote_value(remote_page, "document.querySelector('#email').value"),
            "last_key_to_value_ms": round(last_key_ms),
        },
    )


async def whep_step(scenario: Scenario) -> None:
    """A second viewer of the same session, signaling over WHEP."""
    page, timing = await open_viewer(
        scenario.context, scenario.viewer_url + "&transport=whep", scenario.pages
    )
    pixels = await wait_form_on_video(page, scenario.remote_page, 10)
    status = await viewer_status(page)
    scenario.results.record(
        "whep",
        {
            "mode": status["mode"],
            "state": status["state"],
            "frames": status["frames"],
            "pixels": pixels,
            "selected_pair": await page.evaluate(SELECTED_PAIR),
            **timing,
        },
    )
    await page.close()


async def recovery_step(scenario: Scenario) -> None:
    """The streamer dies; the supervisor restarts it and the open viewer streams again, same page."""
    page = scenario.page
    await page.evaluate("() => { window.__bvmSamePage = true; }")
    streamer = streamer_process(scenario.sandbox)
    assert streamer is not None, "no streamer process found for the sandbox"
    killed_at = time.monotonic()
    killed_iso: str = await page.evaluate("() => new Date().toISOString()")
    streamer.send_signal(signal.SIGKILL)

    def since_kill_ms() -> int:
        return round((time.monotonic() - killed_at) * 1000)

    lost = await wait_for(
        page,
        "losing the connection after the streamer was killed",
        lambda s: any(mark in line for line in log_since(s, killed_iso) for mark in LOST_MARKS),
        30,
    )
    lost_ms = since_kill_ms()
    lost_iso = next(
        line.split()[0] for line in log_since(lost, killed_iso) if any(m in line for m in LOST_MARKS)
    )
    connected = await wait_for(
        page,
        "a new connection to the restarted streamer",
        lambda s: any("peer connection connected" in line for line in log_since(s, lost_iso)),
        30,
    )
    connected_ms = since_kill_ms()
    flowing = await wait_for(
        page, "frames after the reconnection", lambda s: s["frames"] >= connected["frames"] + 10, 10
    )
    flowing_ms = since_kill_ms()
    recovered = await wait_for(page, "the viewer saying streaming", lambda s: s["state"] == "streaming", 10)
    restarted = streamer_process(scenario.sandbox)
    scenario.results.record(
        "recovery",
        {
            "killed_pid": streamer.pid,
            "new_pid": restarted.pid if restarted else None,
            "mode": recovered["mode"],
            "state": recovered["state"],
            "frames_after_reconnect": flowing["frames"] - connected["frames"],
            "reconnects": recovered["reconnects"],
            "same_page": await page.evaluate("() => window.__bvmSamePage === true"),
            "input_channel": await page.evaluate(
                "() => window.browservmViewer.input && window.browservmViewer.input.readyState"
            ),
            "kill_to_connection_lost_ms": lost_ms,
            "kill_to_connected_again_ms": connected_ms,
            "kill_to_frames_again_ms": flowing_ms,
            "kill_to_streaming_state_ms": since_kill_ms(),
            "viewer_log": log_since(recovered, killed_iso),
        },
    )


async def signin_step(scenario: Scenario) -> None:
    """Sign in through the viewer (after the recovery): click the password field, type, click Sign in."""
    page, remote_page = scenario.page, scenario.remote_page
    await click_remote(page, remote_page, "#password")
    await wait_remote(remote_page, FOCUSED, "password", 5)
    await page.keyboard.type("demo")
    await wait_remote(remote_page, "document.querySelector('#password').value.length", 4, 10)
    await click_remote(page, remote_page, "button[type=submit]")
    done = await scenario.controller.wait_status(scenario.session_id, "completed", "failed", timeout_s=30)
    scenario.results.record(
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
