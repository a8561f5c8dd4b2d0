"""How quickly the viewer tells the user what happened to their session, on the process backend.

A real controller (SQLite, process sandboxes, no warm pool, one sandbox slot) on loopback and a headless
Chromium with the viewer in VNC mode. Each round:

1. a first session holds the only slot; the measured one queues behind it, its viewer showing "number 1
   in line"; the first is cancelled: **slot freed → viewer streaming** (its sandbox boots meanwhile);
2. the page is reloaded: **reload → streaming again** (token from sessionStorage);
3. the user signs in (typed into the sandbox's page over DevTools): **completed (`ended_at`) → the
   viewer's "You are signed in" screen**.

Prints medians (min-max). Not a test: figures depend on the machine.

    .venv/bin/python -m bench.viewer_states --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from playwright.async_api import Page

from tests.controller.conftest import controller_settings, run_controller
from tests.controller.demo_login import sign_in
from tests.web.conftest import viewer_browser


async def _status(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(
        "() => window.browservmViewer ? window.browservmViewer.status : {}"
    )
    return value


async def _until(page: Page, check: Any, timeout_s: float = 90) -> float:
    async with asyncio.timeout(timeout_s):
        while not check(await _status(page)):
            await asyncio.sleep(0.02)
    return time.time()


def _streaming(status: dict[str, Any]) -> bool:
    return status.get("state") == "streaming"


def _completed_shown_at(status: dict[str, Any]) -> float:
    line = next(line for line in status["log"] if "session completed" in line)
    return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()


async def main(rounds: int, debug: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="bvm-bench-viewer-"))
    figures: dict[str, list[float]] = {
        "slot freed → streaming": [],
        "reload → streaming": [],
        "completed → signed-in screen": [],
    }
    settings = controller_settings(
        work, f"sqlite+aiosqlite:///{work / 'db.sqlite'}", max_sandboxes=1, log_level="error"
    )
    try:
        async with run_controller(settings) as controller, viewer_browser(work / "profile") as context:
            for n in range(rounds):
                client = controller.client
                blocker = (
                    await client.post("/v1/sessions", json={"user_id": f"b{n}", "provider": "demo"})
                ).json()
                await controller.wait_status(blocker["id"], "awaiting_user")
                measured = (
                    await client.post("/v1/sessions", json={"user_id": f"m{n}", "provider": "demo"})
                ).json()
                page = await context.new_page()
                await page.goto(measured["viewer_url"] + "&mode=vnc")
                await _until(page, lambda s: (s.get("session") or {}).get("queue_position") == 1)
                freed = time.time()
                await client.post(f"/v1/sessions/{blocker['id']}/cancel")
                figures["slot freed → streaming"].append(await _until(page, _streaming) - freed)
                if debug:
                    for line in (await _status(page))["log"]:
                        at = datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()
                        print(f"{(at - freed) * 1000:8.0f} ms  {line.split(' ', 1)[1]}")

                reloaded = time.time()
                await page.reload()
                figures["reload → streaming"].append(await _until(page, _streaming) - reloaded)

                done = await sign_in(controller, measured["id"], f"bench{n}@example.test")
                status = await _status(page)
                await _until(page, lambda s: s.get("state") == "ended")
                status = await _status(page)
                ended_at = datetime.fromisoformat(done["ended_at"].replace("Z", "+00:00")).timestamp()
                figures["completed → signed-in screen"].append(_completed_shown_at(status) - ended_at)
                await page.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{rounds} rounds, median (min-max):")
    for name, values in figures.items():
        ms = [v * 1000 for v in values]
        print(f"  {name:32} {statistics.median(ms):7.0f} ms ({min(ms):.0f}-{max(ms):.0f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--debug", action="store_true", help="print the viewer's log of each round")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.debug))
