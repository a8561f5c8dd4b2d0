"""What the ``firecracker`` backend records of a microVM (its ``handle.runtime``).

:class:`FirecrackerRuntime` holds the sandbox's directory, the VM's own files and jail, the VMM's pid and
start time, the network and whether the VM is hibernated: enough to probe, adopt and destroy it after a
controller restart.
"""

from __future__ import annotations

from pathlib import Path

from browservm.sandbox.base import RuntimeRecord
from browservm.sandbox.firecracker.microvm import MicroVM, VmLayout
from browservm.sandbox.vm_network import VmNetwork

AGENT_VSOCK_PORT = 1024
"""The guest agent's vsock port (the guest's ``--listen vsock:1024``)."""


class FirecrackerRuntime(RuntimeRecord):
    dir: Path
    root: Path
    jail_dir: Path | None = None
    pid: int | None = None
    """The VMM's pid; ``None`` before it started and while the VM is hibernated."""
    start_time: float | None = None
    network: VmNetwork
    vsock_port: int = AGENT_VSOCK_PORT
    hibernated: bool = False

    @classmethod
    def of(
        cls, layout: VmLayout, network: VmNetwork, vm: MicroVM | None, *, hibernated: bool = False
    ) -> FirecrackerRuntime:
        return cls(
            dir=layout.dir,
            root=layout.root,
            jail_dir=layout.jail_dir,
            pid=vm.pid if vm else None,
            start_time=vm.start_time if vm else None,
            network=network,
            hibernated=hibernated,
        )

    @property
    def layout(self) -> VmLayout:
        return VmLayout(self.dir, self.root, self.jail_dir)
