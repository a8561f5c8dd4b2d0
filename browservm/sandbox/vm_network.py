"""A VM's place on the sandbox network (QEMU and Firecracker): a bridge in its namespace joining ``eth0``
and a TAP.

The controller gives every sandbox a namespace whose ``eth0`` is the far end of a routed veth from the
host (:mod:`browservm.sandbox.network`), carrying the guest's address and MAC. A VM's NIC is a TAP, so
the backend makes ``eth0`` and ``tap0`` ports of a bridge ``br0`` inside the namespace and takes the
address off ``eth0``: the guest's virtio NIC then has the guest's MAC and (from ``ip=``) its address on
the host's link, exactly where a process sandbox's ``eth0`` has them, and the host's per-link nftables
policy applies unchanged. ``eth0`` keeps a MAC of its own (a bridge port that had the guest's would take
the guest's frames for itself). Nothing in the namespace has an address: it only switches frames.

::

    host: v<scope>-<hash> ── veth ── eth0 ─┐ br0 (no address) ┌─ tap0 ── QEMU virtio-net: guest MAC, 10.88.0.7/32
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import structlog

from browservm.sandbox.base import SandboxError, SandboxSpec

log = structlog.get_logger(__name__)

TAP = "tap0"
BRIDGE = "br0"
UPLINK = "eth0"
_GONE = ("Cannot find device", "No such file or directory", "does not exist", "Cannot open network namespace")


@dataclass(frozen=True, slots=True)
class VmNetwork:
    netns: str
    address: str
    gateway: str
    prefix_len: int
    mac: str
    dns: tuple[str, ...] = ()
    tap: str = TAP

    @classmethod
    def from_spec(cls, spec: SandboxSpec) -> VmNetwork | None:
        """The VM's addressing from ``spec.network``; ``None`` for a sandbox without a network."""
        network = spec.network
        if network.netns is None:
            return None
        missing = [name for name in ("address", "gateway", "mac") if not getattr(network, name)]
        if missing:
            raise SandboxError(
                spec.sandbox_id,
                f"spec.network names namespace {network.netns} but no {', '.join(missing)}: the controller "
                "attaches the sandbox to its network (browservm.sandbox.network) before create",
            )
        try:
            ipaddress.IPv4Interface(f"{network.address}/{network.prefix_len}")
            ipaddress.IPv4Address(str(network.gateway))
        except ValueError as exc:
            raise SandboxError(spec.sandbox_id, f"spec.network is not a usable IPv4 network: {exc}") from exc
        return cls(
            netns=network.netns,
            address=str(network.address),
            gateway=str(network.gateway),
            prefix_len=network.prefix_len,
            mac=str(network.mac),
            dns=tuple(network.dns)[:2],
        )

    def kernel_ip_arg(self) -> str:
        """``ip=<client>::<gateway>:<netmask>::eth0:off[:<dns0>[:<dns1>]]`` (the kernel's format, which
        the image's initramfs applies)."""
        netmask = ipaddress.IPv4Network(f"0.0.0.0/{self.prefix_len}").netmask
        dns = "".join(f":{server}" for server in self.dns)
        return f"ip={self.address}::{self.gateway}:{netmask}::eth0:off{dns}"

    @property
    def uplink_mac(self) -> str:
        """``eth0``'s own MAC once it is a bridge port: the guest's with another first byte, still a
        locally administered unicast one."""
        return "06" + self.mac[2:]


async def _ip(netns: str, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "ip",
        "-n",
        netns,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate(stdin)
    return process.returncode or 0, stderr.decode(errors="replace").strip()


async def attach_tap(sandbox_id: str, network: VmNetwork, *, owner: tuple[int, int] | None = None) -> None:
    """Make the bridge (once per namespace) and a fresh TAP on it. The TAP is root's unless ``owner``
    (uid, gid) is given (a jailed Firecracker opens it itself; QEMU's launcher opens it for QEMU)."""
    code, _ = await _ip(network.netns, "link", "show", "dev", BRIDGE)
    commands = []
    if code != 0:
        commands += [
            f"link add {BRIDGE} type bridge forward_delay 0 stp_state 0",
            f"link set {BRIDGE} address {network.uplink_mac}",
            f"address flush dev {UPLINK}",
            f"link set {UPLINK} down",
            f"link set {UPLINK} address {network.uplink_mac}",
            f"link set {UPLINK} master {BRIDGE}",
            f"link set {UPLINK} up",
            f"link set {BRIDGE} up",
        ]
    commands += [
        f"tuntap add dev {network.tap} mode tap vnet_hdr"
        + (f" user {owner[0]} group {owner[1]}" if owner is not None else ""),
        f"link set {network.tap} master {BRIDGE}",
        f"link set {network.tap} up",
    ]
    code, error = await _ip(network.netns, "-batch", "-", stdin=("\n".join(commands) + "\n").encode())
    if code != 0:
        raise SandboxError(
            sandbox_id,
            f"cannot put a TAP on a bridge with {UPLINK} in network namespace {network.netns}: {error} "
            "(does the namespace exist? is browservm root or CAP_NET_ADMIN?)",
        )
    log.info("vm.tap_attached", sandbox_id=sandbox_id, netns=network.netns, tap=network.tap)


async def detach_tap(sandbox_id: str, netns: str, tap: str = TAP) -> None:
    """Remove the TAP; a TAP or namespace already gone is not an error. The bridge stays with the
    namespace (a hibernated VM's comes back on it; destroy's namespace removal takes it)."""
    code, error = await _ip(netns, "link", "del", tap)
    if code != 0 and not any(gone in error for gone in _GONE):
        raise SandboxError(sandbox_id, f"cannot remove TAP {tap} from network namespace {netns}: {error}")


async def tap_exists(netns: str, tap: str = TAP) -> bool:
    code, _ = await _ip(netns, "link", "show", "dev", tap)
    return code == 0
