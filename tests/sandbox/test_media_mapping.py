"""The media mapping on the sandbox network: a UDP port of the operator's public address reaches one
guest's streamer port, answers come back from that public address, and nothing else gets through.

"Public" here is 198.18.0.1 on a veth to a viewer namespace the test makes (the benchmark range, inside
the test run's own network namespace): never an address of the machine."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from browservm.sandbox import scope_of
from browservm.sandbox.network import MediaNat, NetworkConfig, SandboxNetwork
from tests.support.netns import PUBLIC_IP, VIEWER_IP, viewer_internet

PUBLIC = ipaddress.IPv4Address(PUBLIC_IP)
VIEWER = VIEWER_IP

_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {port}))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
"""

_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
s.sendto(b"hi", ({host!r}, {port}))
try:
    data, peer = s.recvfrom(2048)
except OSError:
    sys.exit(3)
print(f"{{peer[0]}}:{{peer[1]}}:{{data.decode()}}")
"""

_LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {port}))
s.settimeout(1.5)
try:
    s.recvfrom(2048)
except OSError:
    sys.exit(3)
"""


async def _run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode().strip()


async def _ask(host: str, port: int, netns: str) -> str | None:
    """From ``netns``: send one datagram to host:port; ``peer-ip:peer-port:reply``, or None."""
    code, out = await _run("ip", "netns", "exec", netns, "python3", "-c", _ASK.format(host=host, port=port))
    return out if code == 0 else None


@pytest.fixture
def viewer_netns() -> Iterator[str]:
    """A namespace standing for the internet: 198.18.0.2, routed to the test's 198.18.0.1 ("public")."""
    with viewer_internet("bvmt-view") as name:
        yield name


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    subnet = ipaddress.IPv4Network(f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24")
    net = SandboxNetwork(
        NetworkConfig(
            scope=scope_of(tmp_path),
            subnet=subnet,
            egress="none",
            media=MediaNat(PUBLIC, 41000, 41099, guest_port=40000),
        )
    )
    await net.ensure_host()
    try:
        yield net
    finally:
        for sandbox_id in await net.attached():
            await net.detach(sandbox_id)
        await net.remove_host()


async def test_each_guest_is_reached_at_its_public_port_only(
    network: SandboxNetwork, viewer_netns: str
) -> None:
    base = network.config.subnet.network_address
    await network.attach("a", base + 2)
    await network.attach("b", base + 3)
    map_a = await network.map_media("a", base + 2)
    map_b = await network.map_media("b", base + 3)
    assert map_a is not None and map_b is not None
    assert (map_a.public_port, map_b.public_port) == (41000, 41001), "the port follows the lease"
    echoes = [
        await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", network.netns_of(sid), "python3", "-c", _ECHO.format(port=40000)
        )
        for sid in ("a", "b")
    ]
    try:
        await asyncio.sleep(0.3)
        # The viewer reaches each guest's streamer port at its own public port, and the answer comes
        # from that public address and port (what an ICE candidate of public_ip:port needs).
        assert await _ask(str(PUBLIC), 41000, viewer_netns) == f"{PUBLIC}:41000:echo:hi"
        assert await _ask(str(PUBLIC), 41001, viewer_netns) == f"{PUBLIC}:41001:echo:hi"
        # Not the guest's own address, not an unmapped port of the public address.
        assert await _ask(str(base + 2), 40000, viewer_netns) is None
        assert await _ask(str(PUBLIC), 41002, viewer_netns) is None

        # The mapped port opens no egress: the guest cannot start a flow to the viewer from it.
        listener = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", viewer_netns, "python3", "-c", _LISTEN.format(port=45000)
        )
        await asyncio.sleep(0.3)
        sender = (
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('0.0.0.0', 40001)); s.sendto(b'x', ({VIEWER!r}, 45000))"
        )
        await _run(
            "ip", "netns", "exec", network.netns_of("a"), "python3", "-c", sender.replace("40001", "40000")
        )
        assert await listener.wait() == 3, "a guest started a flow out of its mapped port"

        # Gone with the sandbox's detach.
        await network.detach("b")
        assert await _ask(str(PUBLIC), 41001, viewer_netns) is None
        assert await _ask(str(PUBLIC), 41000, viewer_netns) == f"{PUBLIC}:41000:echo:hi"

        # A controller's start rebuilds the table (no mapping), and maps the live guests again.
        restarted = SandboxNetwork(network.config)
        await restarted.ensure_host()
        assert await _ask(str(PUBLIC), 41000, viewer_netns) is None
        await restarted.map_media("a", base + 2)
        assert await _ask(str(PUBLIC), 41000, viewer_netns) == f"{PUBLIC}:41000:echo:hi"
    finally:
        for echo in echoes:
            if echo.returncode is None:
                echo.kill()
            await echo.wait()


def test_the_port_range_bounds_the_mapped_guests(tmp_path: Path) -> None:
    net = SandboxNetwork(
        NetworkConfig(
            scope=scope_of(tmp_path),
            subnet=ipaddress.IPv4Network("10.99.0.0/24"),
            media=MediaNat(PUBLIC, 41000, 41001),
        )
    )
    base = net.config.subnet.network_address
    assert [m.public_port if (m := net.media_map_for(base + n)) else None for n in (2, 3, 4)] == [
        41000,
        41001,
        None,
    ]
    unmapped = SandboxNetwork(NetworkConfig(scope="x", subnet=ipaddress.IPv4Network("10.99.0.0/24")))
    assert unmapped.media_map_for(base + 2) is None
