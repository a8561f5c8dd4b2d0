"""Media from an isolated guest to a viewer that is not on the host: with the host's 1:1 UDP mapping the
viewer's Chromium gets the video over the sandbox's public port, not through a relay; without it, through
the host's coturn. The whole product runs in a network namespace this test makes (the "host"); the
viewer's Chromium in a second one (the "internet"), joined to it by a veth whose host end carries the
host's "public" address, 198.18.0.1 (the benchmark range, only inside these namespaces).

The scenario is :mod:`tests.web.media_driver`, run once per mode.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.driver import run_driver, step
from tests.support.netns import PUBLIC_IP, VIEWER_IP, namespace_pids, new_namespace, viewer_internet

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def run_in(host: str, viewer: str, mapping: str, rounds: int = 6) -> dict[str, Any]:
    """The scenario in ``host``, with the media mapping ``on`` or ``off``."""
    data = run_driver(
        host, "tests.web.media_driver", "--viewer-netns", viewer, "--public-ip", PUBLIC_IP,
        "--mapping", mapping, "--rounds", str(rounds),
    )  # fmt: skip
    data["left_in_host"] = namespace_pids(host)
    return data


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, dict[str, Any]]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    with new_namespace("bvm-mh") as host, viewer_internet("bvm-mv", host) as viewer:
        yield {mapping: run_in(host, viewer, mapping) for mapping in ("on", "off")}


def test_with_the_mapping_the_video_comes_over_the_public_port_not_a_relay(
    runs: dict[str, dict[str, Any]],
) -> None:
    video = step(runs["on"], "video")
    assert video["mode"] == "webrtc" and video["state"] == "streaming", video
    pair = video["selected_pair"]
    assert pair["local"]["type"] != "relay" and pair["remote"]["type"] != "relay", pair
    assert video["stats"]["path"] == "direct", video
    # The streamer's side of the pair is the host's public address, at the sandbox's mapped port,
    # which the streamer advertised as its host candidate.
    assert pair["remote"]["address"] == PUBLIC_IP and 41000 <= pair["remote"]["port"] <= 41099, pair
    assert any(f"{PUBLIC_IP} {pair['remote']['port']} typ host" in c for c in video["answer_candidates"])
    assert pair["local"]["address"] == VIEWER_IP, pair
    latency = step(runs["on"], "latency")
    assert latency["selected_pair"]["remote"]["type"] != "relay", latency


def test_without_the_mapping_the_video_comes_through_the_relay(runs: dict[str, dict[str, Any]]) -> None:
    video = step(runs["off"], "video")
    assert video["mode"] == "webrtc" and video["state"] == "streaming", video
    pair = video["selected_pair"]
    assert not any(PUBLIC_IP in c for c in video["answer_candidates"]), "a mapping was advertised"
    # Here coturn relays from the gateway address, and its packets leave through the host's masquerade:
    # the viewer sees the streamer's relay as a peer-reflexive candidate (its address hidden) at the
    # relay candidate's port. A production coturn relays from the public address: type relay.
    relay_ports = {int(c.split()[5]) for c in video["answer_candidates"] if " typ relay" in c}
    assert (
        pair["local"]["type"] == "relay"
        or pair["remote"]["type"] == "relay"
        or (pair["remote"]["type"] == "prflx" and pair["remote"]["port"] in relay_ports)
    ), (pair, video["answer_candidates"])


def test_the_viewer_sees_changes_and_its_clicks_land_either_way(runs: dict[str, dict[str, Any]]) -> None:
    for mapping, run in runs.items():
        latency = step(run, "latency")
        assert latency["glass_to_glass_ms"]["n"] >= 6, (mapping, latency)
        assert latency["click_to_focus_ms"]["median"] < 1000, (mapping, latency)


def test_nothing_is_left_running(runs: dict[str, dict[str, Any]]) -> None:
    for mapping, run in runs.items():
        assert run["driver_exit"] == 0, (mapping, run["driver_log"])
        assert run["left_in_host"] == [], (mapping, "processes outlived the driver")
