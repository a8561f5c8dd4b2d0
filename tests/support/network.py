"""A sandbox network for backend tests, without a controller."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path

from browservm.sandbox import scope_of
from browservm.sandbox.base import Resources, Role, SandboxSpec
from browservm.sandbox.network import HostService, NetworkConfig, SandboxNetwork


class BackendNetwork:
    """A sandbox network for backend tests (the controller's SandboxService does this in production):
    one namespace per sandbox, addresses handed out in order, and a web server port guests may reach
    on the gateway."""

    def __init__(self, state_dir: Path) -> None:
        self.web_port = _free_port()
        subnet = ipaddress.IPv4Network(f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(256)}.0/24")
        self.network = SandboxNetwork(
            NetworkConfig(
                scope=scope_of(state_dir), subnet=subnet, host_services=(HostService("tcp", self.web_port),)
            )
        )
        self._next = subnet.network_address + 2

    @property
    def gateway(self) -> str:
        return str(self.network.config.gateway)

    def netns(self, sandbox_id: str) -> str:
        return self.network.netns_of(sandbox_id)

    async def spec(self, sandbox_id: str, role: Role, **resources: int) -> SandboxSpec:
        address, self._next = self._next, self._next + 1
        attachment = await self.network.attach(sandbox_id, address)
        return SandboxSpec(
            sandbox_id=sandbox_id, role=role, resources=Resources(**resources), network=attachment.spec()
        )

    async def remove(self) -> None:
        for sandbox_id in await self.network.attached():
            await self.network.detach(sandbox_id)
        await self.network.remove_host()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
