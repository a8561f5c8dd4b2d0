"""Media from an isolated guest to a viewer off the host: through the host's 1:1 UDP mapping, or TURN.

:mod:`tests.web.test_media_e2e` (and ``bench/isolation.py``) run this inside a network namespace of
their own (the "host") that is joined by a veth to a second one (the "internet", where the viewer's
Chromium runs)::

    host namespace                                       viewer namespace
      198.18.0.1/24 (the host's "public" address) ─ veth ─ 198.18.0.2/24, default via 198.18.0.1
      controller, coturn, sandbox network (bvm-<scope>, guests' namespaces)

    ip netns exec HOST .venv/bin/python -m tests.web.media_driver --viewer-netns VIEW \\
        --public-ip 198.18.0.1 --mapping on|off --state-dir DIR --out results.json

The viewer reaches only the host's public address, as a remote user would: the controller's page and
API, coturn, and (``--mapping on``) the sandbox's mapped UDP port. The guest's own address is not
reachable from there (the host forwards nothing to a guest unasked), so without the mapping the only
media path is TURN. 198.18.0.0/15 is the benchmark range: inside namespaces this test made, never an
address of the machine.

Steps (one ``demo`` session from the warm pool): ``video`` (first frame, the selected ICE pair),
``latency`` (glass-to-glass: the remote page's background changes, timed until the viewer's video shows
it; click-to-focus: a click in the viewer until the remote field has focus). Results are JSON, written
after every step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from playwright.async_api import Page

from browservm.settings import Settings
from tests.controller.conftest import free_port, free_subnet, run_controller
from tests.controller.demo_login import RemotePage, cdp_page, evaluate
from tests.web.conftest import CHROMIUM, viewer_browser
from tests.web.netns_driver import (
    FOCUSED,
    SELECTED_PAIR,
    Results,
    click_remote,
    open_viewer,
    sandbox_dir,
    service_logs,
    viewer_status,
    wait_for,
    wait_form_on_video,
    wait_remote,
    wait_warm,
)

# Resolves with the wall-clock ms of the first decoded frame whose pixel (x, y) is near ``want``.
NEXT_FRAME_WITH = """([x, y, want]) => new Promise((resolve) => {
  const video = document.querySelector(".bvm-viewer video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const g = canvas.getContext("2d", { willReadFrequently: true });
  const deadline = performance.now() + 5000;
  const check = () => {
    g.drawImage(video, 0, 0);
    const p = g.getImageData(x, y, 1, 1).data;
    if (Math.abs(p[0] - want[0]) < 40 && Math.abs(p[1] - want[1]) < 40 && Math.abs(p[2] - want[2]) < 40) {
      resolve(Date.now());
    } else if (performance.now() > deadline) {
      resolve(null);
    } else {
      video.requestVideoFrameCallback(check);
    }
  };
  window.__bvmArmed = true;
  video.requestVideoFrameCallback(check);
})"""

ANSWER_CANDIDATES = """() => {
  const pc = window.browservmViewer && window.browservmViewer.pc;
  const sdp = (pc && pc.remoteDescription && pc.remoteDescription.sdp) || "";
  return sdp.split("\\r\\n").filter((l) => l.startsWith("a=candidate:"));
}"""

PAINT = (
    "(() => {{ for (const e of [document.documentElement, document.body]) e.style.background = '{colour}';"
    " return Date.now(); }})()"
)
COLOURS = [("rgb(220, 30, 30)", (220, 30, 30)), ("rgb(30, 30, 220)", (30, 30, 220))]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 1),
        "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
        "n": len(ordered),
    }


async def glass_to_glass(page: Page, remote_page: RemotePage, rounds: int) -> list[float]:
    """The remote page's background turns red or blue; ms until the viewer decodes a frame showing it."""
    times: list[float] = []
    for index in range(rounds):
        css, rgb = COLOURS[index % 2]
        await page.evaluate("() => { window.__bvmArmed = false; }")
        shown = asyncio.ensure_future(page.evaluate(NEXT_FRAME_WITH, [5, 5, list(rgb)]))
        while not await page.evaluate("() => window.__bvmArmed"):
            await asyncio.sleep(0.01)
        reply = await evaluate(remote_page, PAINT.format(colour=css))
        painted = float(reply["result"]["value"])
        decoded = await shown
        if decoded is None:
            raise AssertionError(f"round {index}: the viewer never showed {css}")
        times.append(float(decoded) - painted)
        await asyncio.sleep(0.3)
    return times


async def click_to_focus(page: Page, remote_page: RemotePage, rounds: int) -> list[float]:
    """A click in the viewer on a remote field, until the remote page says it has focus."""
    times: list[float] = []
    for index in range(rounds):
        field = ("email", "password")[index % 2]
        started = time.monotonic()
        await click_remote(page, remote_page, f"#{field}")
        await wait_remote(remote_page, FOCUSED, field, 5)
        times.append((time.monotonic() - started) * 1000)
    return times


async def run(args: argparse.Namespace, results: Results) -> None:
    state_dir: Path = args.state_dir
    public_ip: str = args.public_ip
    turn_port, port = free_port(), free_port()
    settings = Settings(
        state_dir=state_dir,
        database_url=f"sqlite+aiosqlite:///{state_dir / 'browservm.db'}",
        host="0.0.0.0",
        port=port,
        public_url=f"http://{public_ip}:{port}",
        max_sandboxes=2,
        warm_pool_size=1,
        devtools_debug_port=True,
        session_ttl_s=300,
        reconcile_interval_s=1,
        log_json=False,
        log_level="warning",
        sandbox_subnet=free_subnet(),
        demo_oauth_port=free_port(),
        guest_dns=[],
        run_coturn=True,
        turn_secret=secrets.token_urlsafe(16),
        turn_urls=[
            f"turn:{public_ip}:{turn_port}?transport=udp",
            f"turn:{public_ip}:{turn_port}?transport=tcp",
        ],
        media_public_ip=public_ip if args.mapping == "on" else None,
        media_port_min=41000,
        media_port_max=41099,
    )
    # The viewer's Chromium runs in the viewer's namespace: Playwright talks to it over a pipe, which
    # `ip netns exec` keeps.
    wrapper = state_dir / "chromium-in-viewer-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {args.viewer_netns} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    async with run_controller(settings) as controller:
        profile = state_dir / "viewer-profile"
        sandbox = Path()
        page: Page | None = None
        try:
            async with viewer_browser(profile, executable=str(wrapper)) as context:
                try:
                    await wait_warm(controller)
                    created = await controller.api.sessions.create(user_id="media-e2e", provider="demo")
                    started = time.monotonic()
                    waiting = await controller.wait_status(
                        created.id, "awaiting_user", "failed", timeout_s=60
                    )
                    assert waiting["status"] == "awaiting_user", waiting
                    awaiting_ms = (time.monotonic() - started) * 1000
                    sandbox = sandbox_dir(controller, waiting["sandbox_id"])
                    remote_page = await cdp_page(
                        sandbox / "run" / "chromium-profile", "/demo/oauth/authorize"
                    )
                    # No ice_policy: the viewer takes whichever path works, as a remote user's browser does.
                    pages: list[Page] = []
                    page, timing = await open_viewer(context, created.viewer_url, pages)
                    await wait_form_on_video(page, remote_page, 10)
                    status = await wait_for(page, "stats", lambda s: s.get("stats", {}).get("path"), 5)
                    results.record(
                        "video",
                        {
                            "mapping": args.mapping,
                            "viewer_url": created.viewer_url,
                            "mode": status["mode"],
                            "state": status["state"],
                            "stats": status["stats"],
                            "selected_pair": await page.evaluate(SELECTED_PAIR),
                            "answer_candidates": await page.evaluate(ANSWER_CANDIDATES),
                            "create_to_awaiting_user_ms": round(awaiting_ms),
                            **timing,
                        },
                    )
                    g2g = await glass_to_glass(page, remote_page, args.rounds)
                    clicks = await click_to_focus(page, remote_page, max(4, args.rounds // 2))
                    status = await viewer_status(page)
                    results.record(
                        "latency",
                        {
                            "glass_to_glass_ms": summary(g2g),
                            "click_to_focus_ms": summary(clicks),
                            "input_rtt_ms": status.get("stats", {}).get("inputRttMs"),
                            "selected_pair": await page.evaluate(SELECTED_PAIR),
                        },
                    )
                except BaseException as exc:
                    viewer: dict[str, Any] = {}
                    with contextlib.suppress(Exception):
                        if page is not None:
                            viewer = await viewer_status(page)
                    results.data["error"] = {
                        "message": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "viewer_log": viewer.get("log", []),
                        "service_logs": service_logs(sandbox),
                    }
                    results.write()
                    raise
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="short, empty: holds unix sockets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--viewer-netns", required=True, help="the namespace the viewer's Chromium runs in")
    parser.add_argument("--public-ip", required=True, help="the host's address the viewer reaches")
    parser.add_argument("--mapping", choices=["on", "off"], required=True)
    parser.add_argument("--rounds", type=int, default=10, help="glass-to-glass rounds")
    args = parser.parse_args()
    asyncio.run(run(args, Results(args.out)))


if __name__ == "__main__":
    main()
