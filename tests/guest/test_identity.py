"""The restored guest's root helper acts only on a message it has checked: what the host may set, and
nothing a malformed or oversized line could turn into a command (the VM tests apply real ones)."""

from __future__ import annotations

import base64
import ipaddress
import time
from typing import Any

import pytest

from browservm.guest.identity import BadMessage, Rebirth

ENTROPY = base64.b64encode(bytes(range(64))).decode()


def message(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sandbox_id": "sbx_clone-1",
        "time_ns": time.time_ns(),
        "entropy": ENTROPY,
        "network": {
            "address": "10.88.0.9",
            "gateway": "10.88.0.1",
            "prefix_len": 32,
            "mac": "02:AA:00:00:00:09",
        },
    }
    return {**base, **changes}


def test_a_clone_is_told_its_id_time_entropy_and_address() -> None:
    parsed = Rebirth.parse(message())
    assert parsed.sandbox_id == "sbx_clone-1"
    assert parsed.entropy == bytes(range(64))
    assert parsed.network is not None
    assert parsed.network.address == ipaddress.IPv4Address("10.88.0.9")
    assert parsed.network.mac == "02:aa:00:00:00:09", "normalised for ip(8)"


def test_a_resumed_vm_is_told_only_the_time_and_entropy() -> None:
    parsed = Rebirth.parse(message(sandbox_id=None, network=None))
    assert parsed.sandbox_id is None and parsed.network is None


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"sandbox_id": "../../etc/passwd"}, "sandbox_id"),
        ({"sandbox_id": "a" * 65}, "sandbox_id"),
        ({"time_ns": "now"}, "time_ns"),
        ({"time_ns": -1}, "time_ns"),
        ({"entropy": "not base64!"}, "entropy"),
        ({"entropy": base64.b64encode(b"short").decode()}, "32 to 512"),
        (
            {
                "network": {
                    "address": "10.88.0.9; reboot",
                    "gateway": "10.88.0.1",
                    "prefix_len": 32,
                    "mac": "02:aa:00:00:00:09",
                }
            },
            "IPv4",
        ),
        (
            {
                "network": {
                    "address": "10.88.0.9",
                    "gateway": "10.88.0.1",
                    "prefix_len": 32,
                    "mac": "02:aa:00:00:00:09 dev lo",
                }
            },
            "MAC",
        ),
        (
            {
                "network": {
                    "address": "10.88.0.9",
                    "gateway": "10.88.0.1",
                    "prefix_len": 33,
                    "mac": "02:aa:00:00:00:09",
                }
            },
            "prefix",
        ),
        ({"network": "eth0"}, "object"),
    ],
)
def test_anything_else_is_refused_with_the_reason(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(BadMessage, match=why):
        Rebirth.parse(message(**changes))
