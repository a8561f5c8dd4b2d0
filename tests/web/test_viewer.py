"""The viewer page in a real Chromium: WebRTC video from a real aiortc guest through the controller's
signaling (WebSocket and WHEP), input over the data channel with pointer mapping, fallback to noVNC
through the VNC bridge, recovery after the streamer drops the peer, and refusal of foreign tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aioice.ice
import pytest
from playwright.async_api import BrowserContext, Page, expect

from browservm.controller.turn import Coturn
from browservm.settings import Settings
from tests.controller.viewer_testbed import ViewerBed, VncDesktop, viewer_bed, vnc_desktop
from tests.web.conftest import embedder_site

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    # aioice skips 127.0.0.1; on this loopback-only test bed it is the only address the guest may use.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture
def desktop() -> AsyncIterator[VncDesktop]:
    with vnc_desktop() as running:
        yield running  # type: ignore[misc]


@pytest.fixture
async def bed(desktop: VncDesktop) -> AsyncIterator[ViewerBed]:
    async with viewer_bed(vnc_port=desktop.port) as running:
        yield running


async def status(page: Page) -> dict[str, Any]:
    value: dict[str, Any] = await page.evaluate(
        "() => window.browservmViewer && window.browservmViewer.status"
    )
    return value


async def wait_streaming(page: Page, mode: str, timeout_s: float = 15) -> dict[str, Any]:
    current: dict[str, Any] = {}
    async with asyncio.timeout(timeout_s):
        while True:
            current = await status(page) or {}
            if current.get("state") == "streaming" and current.get("mode") == mode:
                return current
            await asyncio.sleep(0.1)


async def open_viewer(context: BrowserContext, bed: ViewerBed, query: str = "") -> Page:
    page = await context.new_page()
    await page.goto(f"{bed.url}/view/{bed.session_id}?token={bed.token}{query}")
    return page


async def guest_inputs(bed: ViewerBed, predicate: Any, timeout_s: float = 5) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout_s):
        while True:
            messages = [json.loads(m) for m in bed.guest.input_messages]
            if predicate(messages):
                return messages
            await asyncio.sleep(0.05)


async def test_viewer_streams_and_sends_mapped_clicks_and_keys(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{bed.url}/view/{bed.session_id}?token={bed.token}")
    state = await wait_streaming(page, "webrtc")
    assert state["frames"] > 0
    assert (state["remoteWidth"], state["remoteHeight"]) == (320, 240)
    # The token left the address bar once the page had it.
    assert "token=" not in page.url

    # The 320x240 picture is letterboxed in the video element: its centre is the remote (160, 120),
    # and its top-left corner is the remote (0, 0).
    box = await page.locator("video").bounding_box()
    assert box is not None
    scale = min(box["width"] / 320, box["height"] / 240)
    left = box["x"] + (box["width"] - 320 * scale) / 2
    top = box["y"] + (box["height"] - 240 * scale) / 2
    await page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await page.mouse.click(left + 1, top + 1)
    messages = await guest_inputs(bed, lambda ms: sum(m["t"] == "up" for m in ms) >= 2)
    assert messages[0] == {"t": "ping", "ts": messages[0]["ts"]}
    downs = [m for m in messages if m["t"] == "down"]
    assert abs(downs[0]["x"] - 160) <= 1 and abs(downs[0]["y"] - 120) <= 1
    assert downs[1]["x"] <= 1 and downs[1]["y"] <= 1
    assert downs[0]["button"] == 1  # X's left button

    await page.keyboard.type("Hi!")
    messages = await guest_inputs(bed, lambda ms: sum(m["t"] == "key" and not m["down"] for m in ms) >= 3)
    keys = [(m["key"], m["code"]) for m in messages if m["t"] == "key" and m["down"] and m["key"] != "Shift"]
    assert keys == [("H", "KeyH"), ("i", "KeyI"), ("!", "Digit1")]

    await page.mouse.wheel(0, 120)
    messages = await guest_inputs(bed, lambda ms: any(m["t"] == "wheel" for m in ms))
    assert next(m for m in messages if m["t"] == "wheel")["dy"] == 120

    # Pasting sends the local clipboard text to the remote (clipboard, then typed as text).
    await page.evaluate(
        """() => {
            const data = new DataTransfer();
            data.setData('text/plain', 'pasted secret');
            document.querySelector('video').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
        }"""
    )
    messages = await guest_inputs(bed, lambda ms: any(m["t"] == "text" for m in ms))
    assert {"t": "clipboard", "text": "pasted secret"} in messages
    assert {"t": "text", "text": "pasted secret"} in messages

    # The stats overlay reads getStats: a direct path with a frame rate.
    async with asyncio.timeout(5):
        while "direct" not in (await page.locator(".bvm-stats").text_content() or ""):
            await asyncio.sleep(0.2)
    assert errors == []


async def test_viewer_recovers_when_the_streamer_drops_it(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await open_viewer(browser_context, bed)
    await wait_streaming(page, "webrtc")
    assert bed.guest.offers == 1
    (peer_id,) = bed.guest.peers
    bed.guest.kill_peer(peer_id)
    async with asyncio.timeout(15):
        while not ((s := await status(page))["reconnects"] >= 1 and s["state"] == "streaming"):
            await asyncio.sleep(0.1)
    assert s["mode"] == "webrtc"
    assert bed.guest.offers == 2
    assert list(bed.guest.peers) != [peer_id]


async def test_impossible_relay_policy_falls_back_to_vnc_with_working_input(
    browser_context: BrowserContext, bed: ViewerBed, desktop: VncDesktop
) -> None:
    # Relay-only with no TURN server configured: ICE cannot succeed, so no frame ever comes.
    page = await open_viewer(browser_context, bed, "&ice_policy=relay&first_frame_timeout_ms=3000")
    state = await wait_streaming(page, "vnc", timeout_s=20)
    assert state["fallbackReason"]
    canvas = page.locator(".bvm-vnc canvas")
    await canvas.wait_for()
    box = await canvas.bounding_box()
    assert box is not None
    # The 640x480 remote screen is scaled into the canvas: a click at 3/4 of it lands at (480, 360).
    await page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.75)
    await page.mouse.down()
    await page.mouse.up()
    async with asyncio.timeout(5):
        while True:
            x, y = await asyncio.to_thread(desktop.pointer)
            if abs(x - 480) <= 3 and abs(y - 360) <= 3:
                break
            await asyncio.sleep(0.1)

    # And back to WebRTC on request (the default policy this time works).
    await page.evaluate("() => { window.browservmViewer.icePolicy = 'all'; }")
    await page.locator(".bvm-switch").click()
    await wait_streaming(page, "webrtc")


async def test_whep_transport_streams(browser_context: BrowserContext, bed: ViewerBed) -> None:
    page = await open_viewer(browser_context, bed, "&transport=whep")
    await wait_streaming(page, "webrtc")
    assert next(iter(bed.guest.peers)).startswith("whep-")


async def test_viewer_page_refuses_a_token_of_another_session(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await browser_context.new_page()
    response = await page.goto(f"{bed.url}/view/{bed.session_id}?token={bed.token_for('other-session')}")
    assert response is not None
    assert response.status == 403
    assert "another session" in (await page.locator(".bvm-refused").text_content() or "")
    assert not bed.guest.peers


async def test_viewer_embeds_as_a_web_component_in_another_origin(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await browser_context.new_page()
    host = f"""<!doctype html><script type="module" src="{bed.url}/static/embed.js"></script>
        <browservm-viewer session="{bed.session_id}" token="{bed.token}"></browservm-viewer>"""
    # The embedding page comes from another origin: a plain HTTP server at localhost, not 127.0.0.1.
    with embedder_site(host) as embedder:
        await page.goto(embedder)
        async with asyncio.timeout(15):
            while True:
                frame = next((f for f in page.frames if "/view/" in f.url), None)
                if frame is not None:
                    state = await frame.evaluate(
                        "() => window.browservmViewer && window.browservmViewer.status"
                    )
                    if state and state["state"] == "streaming":
                        break
                await asyncio.sleep(0.1)
    response = await page.request.get(f"{bed.url}/view/{bed.session_id}?token={bed.token}")
    assert "frame-ancestors *" in response.headers["content-security-policy"]


@pytest.mark.parametrize("secret_matches", [True, False], ids=["minted-credential", "wrong-secret"])
async def test_relay_only_viewer_goes_through_coturn(
    browser_context: BrowserContext, desktop: VncDesktop, tmp_path: Path, secret_matches: bool
) -> None:
    async with Coturn(secret="viewer-turn-secret", min_port=49600, max_port=49699) as coturn:
        settings = Settings(
            state_dir=tmp_path,
            turn_urls=[coturn.urls[0]],
            turn_secret="viewer-turn-secret" if secret_matches else "some-other-secret",
        )
        async with viewer_bed(settings, vnc_port=desktop.port) as bed:
            page = await open_viewer(browser_context, bed, "&ice_policy=relay&first_frame_timeout_ms=4000")
            if not secret_matches:
                # coturn refuses the credential, so relay-only ICE fails and the viewer falls back.
                await wait_streaming(page, "vnc", timeout_s=20)
                return
            await wait_streaming(page, "webrtc")
            async with asyncio.timeout(5):
                while (await status(page))["stats"].get("path") != "relay":
                    await asyncio.sleep(0.2)


async def test_an_ice_restart_brings_the_video_back_at_once(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    """What the viewer does when its connection drops: an ICE restart, a new offer for the same peer,
    which the guest answers with a new peer behind the same id. The viewer is streaming again as soon
    as frames flow (not after its 5 s give-up timer), without a full reconnect."""
    page = await open_viewer(browser_context, bed)
    await wait_streaming(page, "webrtc")
    await page.evaluate("() => { const v = window.browservmViewer; v.restartIce(v.generation); }")
    async with asyncio.timeout(15):
        while not ((s := await status(page))["state"] == "streaming" and bed.guest.offers == 2):
            await asyncio.sleep(0.05)
    log = s["log"]
    restarted = next(i for i, line in enumerate(log) if "state reconnecting (ICE restart)" in line)
    streaming = next(i for i, line in enumerate(log) if i > restarted and "state streaming" in line)
    elapsed_ms = (parse_log_time(log[streaming]) - parse_log_time(log[restarted])).total_seconds() * 1000
    assert elapsed_ms < 4000, f"streaming again only after {elapsed_ms:.0f} ms: the give-up timer, not frames"
    assert s["reconnects"] == 0 and s["mode"] == "webrtc"


def parse_log_time(line: str) -> datetime:
    return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00"))


async def test_full_screen_control_enters_and_leaves_full_screen(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await open_viewer(browser_context, bed)
    await wait_streaming(page, "webrtc")
    button = page.locator(".bvm-fullscreen")
    assert await button.is_visible()
    assert await page.locator(".bvm-keyboard").is_hidden()  # a mouse and keyboard: no on-screen keys
    await button.click()
    async with asyncio.timeout(5):
        while await page.evaluate("() => document.fullscreenElement?.className") != "bvm-viewer":
            await asyncio.sleep(0.05)
    await expect(button).to_have_text("Exit full screen")  # set by the fullscreenchange event
    await button.click()
    async with asyncio.timeout(5):
        while await page.evaluate("() => document.fullscreenElement !== null"):
            await asyncio.sleep(0.05)
    await expect(button).to_have_text("Full screen")


async def test_a_touch_device_gets_an_on_screen_keyboard_that_types_remotely(
    phone_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await open_viewer(phone_context, bed)
    await wait_streaming(page, "webrtc")
    # A tap on the remote screen is a click there.
    box = await page.locator("video").bounding_box()
    assert box is not None
    await page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    await guest_inputs(bed, lambda ms: any(m["t"] == "up" for m in ms))

    keyboard = page.locator(".bvm-keyboard")
    assert await keyboard.is_visible()
    await keyboard.tap()
    # The focused text field is what makes a phone open its keyboard.
    assert await page.evaluate("() => document.activeElement.className") == "bvm-keys"
    await page.keyboard.insert_text("hé!")
    await page.keyboard.press("Backspace")
    await page.keyboard.press("Enter")
    messages = await guest_inputs(
        bed, lambda ms: any(m["t"] == "key" and m["key"] == "Enter" and not m["down"] for m in ms)
    )
    typed = [m for m in messages if m["t"] in ("text", "key")]
    assert typed == [
        {"t": "text", "text": "hé!"},
        {"t": "key", "key": "Backspace", "code": "Backspace", "down": True},
        {"t": "key", "key": "Backspace", "code": "Backspace", "down": False},
        {"t": "key", "key": "Enter", "code": "Enter", "down": True},
        {"t": "key", "key": "Enter", "code": "Enter", "down": False},
    ]
    # Nothing piles up in the stand-in field.
    assert await page.locator(".bvm-keys").input_value() == ""


async def test_the_viewer_asks_the_remote_screen_to_follow_its_size(
    browser_context: BrowserContext, bed: ViewerBed
) -> None:
    page = await open_viewer(browser_context, bed)
    await wait_streaming(page, "webrtc")

    async def screen_size() -> dict[str, int]:
        size: dict[str, int] = await page.evaluate(
            "() => { const s = document.querySelector('.bvm-screen');"
            " return {width: s.clientWidth, height: s.clientHeight}; }"
        )
        return {key: value - value % 2 for key, value in size.items()}

    def resizes(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [m for m in messages if m["t"] == "resize"]

    first = await screen_size()
    messages = await guest_inputs(bed, lambda ms: resizes(ms))
    assert resizes(messages) == [{"t": "resize", **first}]

    # A smaller window (a phone held upright): one new request once the resizing settles.
    await page.set_viewport_size({"width": 390, "height": 640})
    second = await screen_size()
    assert second != first
    messages = await guest_inputs(bed, lambda ms: len(resizes(ms)) >= 2)
    assert resizes(messages)[-1] == {"t": "resize", **second}
