"""Per-guest egress on the sandbox network: a guest held to its proxy reaches that proxy and TURN,
nothing else; ``direct`` reaches what a guest reaches without pools; a rebuilt table forgets grants."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm.sandbox import scope_of
from browservm.sandbox.network import GuestEgress, HostService, NetworkConfig, NetworkError, SandboxNetwork
from tests.support.network import _free_port


async def _reach(netns: str, address: str, port: int) -> bool:
    """Whether a TCP connection from inside ``netns`` to address:port is answered (within 1.5 s)."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"sys.exit(0 if s.connect_ex(({address!r},{port}))==0 else 1)\n"
    )
    process = await asyncio.create_subprocess_exec("ip", "netns", "exec", netns, "python3", "-c", code)
    return await process.wait() == 0


class Listeners:
    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []

    async def listen(self, host: str, port: int) -> None:
        async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        self.servers.append(await asyncio.start_server(answer, host, port))

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[SandboxNetwork]:
    subnet = ipaddress.IPv4Network(f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24")
    turn, demo = _free_port(), _free_port()
    net = SandboxNetwork(
        NetworkConfig(
            scope=scope_of(tmp_path),
            subnet=subnet,
            host_services=(HostService("tcp", turn, every_guest=True), HostService("tcp", demo)),
            per_guest=True,
        )
    )
    await net.ensure_host()
    try:
        yield net
    finally:
        for sandbox_id in await net.attached():
            await net.detach(sandbox_id)
        await net.remove_host()


async def test_a_proxied_guest_reaches_its_proxy_and_turn_only(network: SandboxNetwork) -> None:
    gateway = str(network.config.gateway)
    turn, demo = (s.port for s in network.config.host_services)
    proxy_a, proxy_b = _free_port(), _free_port()
    listeners = Listeners()
    for port in (turn, demo, proxy_a, proxy_b):
        await listeners.listen(gateway, port)
    try:
        base = network.config.subnet.network_address
        await network.attach("a", base + 2)
        await network.attach("b", base + 3)
        ns_a, ns_b = network.netns_of("a"), network.netns_of("b")

        # Given nothing yet (a warm sandbox): only TURN.
        assert await _reach(ns_a, gateway, turn)
        assert not await _reach(ns_a, gateway, demo)
        assert not await _reach(ns_a, gateway, proxy_a)

        await network.set_egress("a", GuestEgress("proxy", (network.config.gateway, proxy_a)))
        await network.set_egress("b", GuestEgress("proxy", (network.config.gateway, proxy_b)))
        assert await _reach(ns_a, gateway, proxy_a)
        assert not await _reach(ns_a, gateway, proxy_b), "a reached b's proxy"
        assert not await _reach(ns_a, gateway, demo), "a proxied guest reached a host service directly"
        assert await _reach(ns_b, gateway, proxy_b)
        assert not await _reach(ns_b, gateway, proxy_a)

        # Rotated to another proxy: the old one is out of reach at once.
        await network.set_egress("a", GuestEgress("proxy", (network.config.gateway, proxy_b)))
        assert await _reach(ns_a, gateway, proxy_b)
        assert not await _reach(ns_a, gateway, proxy_a)

        await network.set_egress("a", GuestEgress("direct"))
        assert await _reach(ns_a, gateway, demo)
        assert not await _reach(ns_a, gateway, proxy_a), "direct opens host services, not every port"

        # A controller's restart rebuilds the table: every grant is forgotten (fails closed).
        await SandboxNetwork(network.config).ensure_host()
        assert not await _reach(ns_b, gateway, proxy_b)
        assert await _reach(ns_b, gateway, turn)
    finally:
        listeners.close()


async def test_without_pools_set_egress_is_refused(tmp_path: Path) -> None:
    net = SandboxNetwork(
        NetworkConfig(scope=scope_of(tmp_path), subnet=ipaddress.IPv4Network("10.99.0.0/24"))
    )
    with pytest.raises(NetworkError, match="no proxy pool"):
        await net.set_egress("x", GuestEgress("direct"))
