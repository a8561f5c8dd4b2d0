"""The guest's screen follows a viewer's size on a real Xvfb (RandR) with a real kiosk Chromium: the
display takes the size, and the browser's page is laid out again at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.guest.screen_size import ScreenBounds, ScreenSizer
from tests.guest.desktop_testbed import Chromium, Xvfb, write_page

pytestmark = pytest.mark.browser

BOUNDS = ScreenBounds(min_width=360, min_height=360, max_width=1920, max_height=1080)


def test_a_requested_size_is_clamped_to_the_bounds_and_made_even() -> None:
    assert BOUNDS.fit(390, 641) == (390, 640)
    assert BOUNDS.fit(200, 100) == (360, 360)
    assert BOUNDS.fit(5000, 3000) == (1920, 1080)


@pytest.fixture
async def desktop(tmp_path: Path) -> AsyncIterator[tuple[Xvfb, Chromium]]:
    xvfb = Xvfb(BOUNDS.max_width, BOUNDS.max_height)  # started at the largest size, as the guest must
    chromium = Chromium(xvfb.display, write_page(tmp_path), 1280, 720)
    try:
        await chromium.connect()
        yield xvfb, chromium
    finally:
        await chromium.stop()
        xvfb.stop()


async def layout(chromium: Chromium) -> list[int]:
    value: list[int] = await chromium.evaluate("[innerWidth, innerHeight, screen.width, screen.height]")
    return value


async def test_the_screen_and_the_browser_follow_a_phones_size_and_back(
    desktop: tuple[Xvfb, Chromium],
) -> None:
    xvfb, chromium = desktop
    sizer = ScreenSizer(xvfb.display)
    try:
        assert sizer.largest() == (1920, 1080)
        for wanted in [BOUNDS.fit(390, 640), BOUNDS.fit(1280, 720), BOUNDS.fit(1919, 1079)]:
            assert sizer.resize(*wanted) == wanted
            async with asyncio.timeout(5):  # the page is laid out again at the new size
                while await layout(chromium) != [*wanted, *wanted]:
                    await asyncio.sleep(0.05)
        # Past what Xvfb was started with, the screen stays at its largest instead of failing.
        assert sizer.resize(2560, 1440) == (1920, 1080)
    finally:
        sizer.close()
