"""A whole demo sign-in with the browser in a QEMU microVM: the operator starts a session on a controller
with ``BROWSERVM_BACKEND=qemu``, the user opens the viewer link in a real Chromium, sees the guest's
sign-in page over noVNC and signs in with the keyboard, and the session completes. Then the same over
WebRTC, in a warm VM that the pool restored from a snapshot of a prepared one instead of booting it.

Under TCG (software emulation, all these machines can run) it takes about 45 s on an idle 2-core machine
(docs/qemu.md); ``BROWSERVM_TEST_QEMU_BROWSER=0`` leaves it out. On a KVM host it is the same test, faster.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page

from browservm.sandbox.image import ImageStore
from browservm.settings import Settings
from tests.controller.conftest import controller_settings, run_controller
from tests.support.warm_pool import wait_warm

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        os.environ.get("BROWSERVM_TEST_QEMU_BROWSER") == "0", reason="BROWSERVM_TEST_QEMU_BROWSER=0"
    ),
]

# The sign-in page is a white card (centre) on a #f4f5f7 background (corner).
FORM_SHOWN = """(canvas) => {
    const pixel = (x, y) => Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3));
    return pixel(canvas.width / 2, canvas.height / 2).join() === '255,255,255'
        && pixel(5, 5).join() === '244,245,247';
}"""


# The current WebRTC frame's centre and corner, read off the viewer's <video>.
VIDEO_FORM_SHOWN = """() => {
    const video = document.querySelector('.bvm-viewer video');
    if (!video || !video.videoWidth) return false;
    const canvas = document.createElement('canvas');
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const g = canvas.getContext('2d');
    g.drawImage(video, 0, 0);
    const near = (x, y, rgb) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3))
        .every((value, i) => Math.abs(value - rgb[i]) <= 6);
    return near(canvas.width / 2, canvas.height / 2, [255, 255, 255]) && near(5, 5, [244, 245, 247]);
}"""
VIEWER_STATE = "() => window.browservmViewer ? window.browservmViewer.status.state : null"


def qemu_settings(tmp_path: Path, **overrides: object) -> Settings:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    image = ImageStore(Path(os.environ["BROWSERVM_IMAGE_DIR"])).current("browser")
    assert image is not None, "no browser image: scripts/test.sh builds it"
    return controller_settings(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'browservm.db'}",
        backend="qemu",
        vm_kernel=image.vmlinux,
        vm_rootfs=image.rootfs,
        vm_initrd=image.initramfs,
        sandbox_boot_timeout_s=900,
        session_ttl_s=1500,
        devtools_debug_port=False,
        **overrides,
    )


async def sign_in_with_the_keyboard(page: Page, x: float, y: float, email: str) -> None:
    """As in tests/web/test_viewer_e2e.py: a click on the sign-in page's background, then the keyboard."""
    await page.mouse.click(x, y)
    await page.keyboard.press("Tab")
    await page.keyboard.type(email, delay=50)
    await page.keyboard.press("Tab")
    await page.keyboard.type("demo", delay=50)
    await page.keyboard.press("Enter")


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_demo_sign_in_completes_with_the_browser_in_a_qemu_vm(
    browser_context: BrowserContext, tmp_path: Path
) -> None:
    settings = qemu_settings(tmp_path)
    async with run_controller(settings) as controller:
        started = time.monotonic()
        created = await controller.api.sessions.create(user_id="qemu-user", provider="demo")
        await controller.wait_status(created.id, "awaiting_user", timeout_s=1200)
        awaiting_s = time.monotonic() - started

        page = await browser_context.new_page()
        await page.goto(created.viewer_url + "&mode=vnc")
        canvas = page.locator(".bvm-vnc canvas")
        await canvas.wait_for(timeout=120_000)
        async with asyncio.timeout(300):
            while not await canvas.evaluate(FORM_SHOWN):
                await asyncio.sleep(0.5)
        shown_s = time.monotonic() - started
        box = await canvas.bounding_box()
        assert box is not None
        await sign_in_with_the_keyboard(page, box["x"] + 10, box["y"] + 10, "qemu@example.test")
        done = await controller.wait_status(created.id, "completed", "failed", timeout_s=600)
        assert done["status"] == "completed", done
        assert done["account"].get("email") == "qemu@example.test"
        print(
            f"\nqemu browser VM ({settings.qemu_accel}): awaiting_user after {awaiting_s:.0f} s, "
            f"sign-in page on the viewer after {shown_s:.0f} s, "
            f"completed after {time.monotonic() - started:.0f} s"
        )


async def test_a_warm_vm_restored_from_a_snapshot_serves_a_sign_in_over_webrtc(
    browser_context: BrowserContext, tmp_path: Path
) -> None:
    settings = qemu_settings(tmp_path, warm_pool_size=1, max_sandboxes=2)
    async with run_controller(settings) as controller:
        started = time.monotonic()
        (warm,) = await wait_warm(settings.effective_database_url, timeout_s=1200)
        warm_s = time.monotonic() - started
        metrics = (await controller.client.get("/metrics")).text
        restored = 'browservm_sandbox_boot_seconds_count{backend="qemu",how="restore"}'
        assert metric(metrics, restored) == 1, "the warm VM was restored, not booted"
        restore_s = metric(metrics, 'browservm_sandbox_boot_seconds_sum{backend="qemu",how="restore"}')
        boot_s = metric(metrics, 'browservm_sandbox_boot_seconds_sum{backend="qemu",how="boot"}')

        started = time.monotonic()
        created = await controller.api.sessions.create(user_id="qemu-user", provider="demo")
        waiting = await controller.wait_status(created.id, "awaiting_user", "failed", timeout_s=600)
        assert waiting["status"] == "awaiting_user", waiting
        assert waiting["sandbox_id"] == warm, "the session runs in the restored VM"
        awaiting_s = time.monotonic() - started

        page = await browser_context.new_page()
        opened = time.monotonic()
        await page.goto(created.viewer_url)
        async with asyncio.timeout(300):
            while await page.evaluate(VIEWER_STATE) != "streaming":
                await asyncio.sleep(0.1)
        first_frame_s = time.monotonic() - opened
        async with asyncio.timeout(300):
            while not await page.evaluate(VIDEO_FORM_SHOWN):
                await asyncio.sleep(0.25)
        video = page.locator(".bvm-viewer video")
        box = await video.bounding_box()
        assert box is not None
        # Input over the data channel this time.
        await sign_in_with_the_keyboard(
            page, box["x"] + box["width"] / 2, box["y"] + 12, "restored@example.test"
        )
        done = await controller.wait_status(created.id, "completed", "failed", timeout_s=600)
        assert done["status"] == "completed", done
        assert done["account"].get("email") == "restored@example.test"
        print(
            f"\nqemu browser VM ({settings.qemu_accel}) from a snapshot: pool warm after {warm_s:.0f} s "
            f"(booting and preparing the saved one {boot_s:.1f} s to hello, restoring {restore_s:.1f} s), "
            f"awaiting_user {awaiting_s:.1f} s after create, first WebRTC frame {first_frame_s:.1f} s "
            f"after the viewer opened, completed {time.monotonic() - started:.0f} s after create"
        )
