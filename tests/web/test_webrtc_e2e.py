"""WebRTC through the whole real stack: Playwright Chromium → viewer page → controller signaling (WebSocket
and WHEP) → guest agent → the real streamer in a real process sandbox, all inside a network namespace
this test creates, where loopback is the only network.

The scenario runs once per module (:mod:`tests.web.netns_driver`, one ``demo`` session; starting a
sandbox and two Chromiums is most of the cost) and each test checks one thing a user would notice.
The namespace and every process in it are removed afterwards, whatever happened.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.driver import run_driver, step
from tests.support.netns import ip, namespace_pids, new_namespace

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EMAIL = "netns-e2e@example.test"


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    with new_namespace("bvm-e2e") as name:
        # 127.0.0.2 is there as in every loopback test bed (aioice skips 127.0.0.1; research/streaming.md).
        ip("-n", name, "addr", "add", "127.0.0.2/8", "dev", "lo")
        yield name


@pytest.fixture(scope="module")
def results(namespace: str) -> dict[str, Any]:
    return run_driver(namespace, "tests.web.netns_driver")


def test_viewer_gets_webrtc_video_of_the_isolated_guest_through_turn(results: dict[str, Any]) -> None:
    video = step(results, "video")
    assert video["mode"] == "webrtc" and video["state"] == "streaming", video
    assert video["fallback_reason"] is None, video
    # The remote screen took the size of the viewer's area (it started at 1280x720).
    assert video["remote_size"] == video["requested_size"] != [1280, 720], video
    # The guest may reach only its host's coturn: the pair that works is through its relay address.
    assert video["stats"]["path"] == "relay" and "relay" in video["overlay"], video
    pair = video["selected_pair"]
    assert "relay" in (pair["local"]["type"], pair["remote"]["type"]), pair


def test_awaiting_user_comes_when_the_sign_in_page_has_loaded(results: dict[str, Any]) -> None:
    assert step(results, "video")["warm_sandbox"], "the session should have taken the warm sandbox"
    shown = step(results, "video")["page_at_awaiting_user"]
    assert "/demo/oauth/authorize" in shown["url"], shown
    assert shown["ready_state"] == "complete", shown


def test_clicks_and_typing_in_the_viewer_reach_the_remote_page(results: dict[str, Any]) -> None:
    typed = step(results, "input")
    assert typed["focused"] == "email"
    assert typed["email_value"] == EMAIL


def test_whep_viewer_gets_video_from_the_real_streamer(results: dict[str, Any]) -> None:
    whep = step(results, "whep")
    assert whep["mode"] == "webrtc" and whep["state"] == "streaming", whep
    assert whep["frames"] > 0
    pair = whep["selected_pair"]
    assert "relay" in (pair["local"]["type"], pair["remote"]["type"]), whep


def test_viewer_recovers_without_reload_when_the_streamer_is_killed(results: dict[str, Any]) -> None:
    recovery = step(results, "recovery")
    assert recovery["new_pid"] is not None and recovery["new_pid"] != recovery["killed_pid"], recovery
    assert recovery["same_page"] is True
    assert recovery["mode"] == "webrtc" and recovery["state"] == "streaming", recovery
    assert recovery["frames_after_reconnect"] >= 10


def test_user_signs_in_through_the_webrtc_viewer(results: dict[str, Any]) -> None:
    signin = step(results, "signin")
    assert signin["status"] == "completed", signin
    assert signin["account"]["email"] == EMAIL


def test_nothing_is_left_running(results: dict[str, Any], namespace: str) -> None:
    assert results["driver_exit"] == 0, results["driver_log"]
    assert namespace_pids(namespace) == [], "processes outlived the driver in the namespace"
