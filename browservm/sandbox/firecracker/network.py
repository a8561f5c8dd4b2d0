"""A microVM's network: the same as a QEMU VM's (:mod:`browservm.sandbox.vm_network`).

The controller gives the sandbox a namespace whose ``eth0`` is the far end of the host's routed link,
with the guest's address and MAC; a TAP on a bridge with ``eth0`` inside it carries the VM's virtio-net
(its MAC the guest's), so the host's policy applies to the VM as to a process sandbox. The guest learns
its address from the kernel command line (``ip=``). Firecracker needs a network: a spec without a
namespace is refused.
"""

from __future__ import annotations

from browservm.sandbox.base import SandboxError, SandboxSpec
from browservm.sandbox.vm_network import VmNetwork, attach_tap, detach_tap

__all__ = ["VmNetwork", "attach_tap", "detach_tap", "network_of"]


def network_of(spec: SandboxSpec) -> VmNetwork:
    network = VmNetwork.from_spec(spec)
    if network is None:
        raise SandboxError(
            spec.sandbox_id,
            "the firecracker backend needs the sandbox's network namespace and addresses, but spec.network "
            "has no netns: the controller attaches the sandbox to its network before create",
        )
    return network
