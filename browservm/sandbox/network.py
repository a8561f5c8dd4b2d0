"""A network of its own for every sandbox: a network namespace joined to the host by one routed veth,
and an nftables policy that lets a guest reach only what its session allows.

Shape (``scope`` names everything of one controller, so two controllers on a host never touch each
other's)::

    host (the controller's network namespace)                  sandbox namespace bvm-<scope>-<id>
      bridge bvm-<scope> (no ports): gateway 10.88.0.1/32  ─┐
      v<scope>-<hash> (no address) ── route 10.88.0.7/32 ──── veth ──── eth0 10.88.0.7/32, default via gateway
      nftables table inet browservm_<scope>     ┘                lo (the guest's own loopback)

Each guest has a point-to-point link of its own instead of a port on a shared bridge: the policy is
written per interface (``iifname``), a guest has no layer-2 neighbour to spoof or sniff, and guest to
guest is routed, so the host drops it. (A VM backend puts a bridge inside the sandbox namespace that
joins ``eth0`` and its TAP; the host side stays the same.)

Policy, for traffic from this controller's guest links (``v<scope>-*``):

* to the host itself: only the services in ``host_services`` (TURN's port, the demo OAuth server's) on
  the gateway address; never the controller's API, never anything on the host's loopback (a guest's
  ``127.0.0.1`` is its own), never another host address;
* onwards (forwarded): DNS to the configured resolvers; with egress ``direct``, any public address
  (masqueraded), never a private, loopback, link-local (cloud metadata), CGNAT or multicast one, never
  another guest; with egress ``none``, nothing. IPv6 is dropped (guests have none).

With per-guest egress (``NetworkConfig.per_guest``: the controller has proxy pools, docs/egress.md) a
guest reaches, besides the services every guest may (TURN), only what :meth:`SandboxNetwork.set_egress`
gave its link: its proxy (and DNS for a proxy known by name), or everything as above (``direct``). A
link that was given nothing, a warm sandbox before its session among them, reaches only TURN. Fails
closed: the table rebuilt at a controller's start forgets every link's grant until it is given again.

Media mapping (``NetworkConfig.media``, an operator's public address): each browser guest gets a UDP
port of that address of its own, mapped 1:1 (DNAT) to its address and the streamer's fixed ICE port, so
a viewer's browser reaches the streamer without TURN. The port follows from the guest's leased address
(``port_min`` plus the address's place in the subnet), so it is stored with the lease and needs no
table of its own. Only what arrives at the mapped port passes to the guest, and the guest's answers
go back through the same conntrack entry (rewritten to come from the public address); the mapped port
opens no new egress: the guest may not start a flow from it.

Nothing reaches a guest unasked (but through its media mapping): towards a guest link only replies pass. The controller reaches guests only
through their channel (a unix socket, a serial port, vsock), never over this network.

Everything here is done with ``ip`` and ``nft`` (iproute2 and nftables), as root in the controller's
network namespace. In tests that namespace is one the test run created, never the machine's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from browservm.sandbox.base import NetworkSpec

log = structlog.get_logger(__name__)

PRIVATE = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
)  # fmt: skip
"""Destinations a guest never reaches directly, whatever its egress: the host's and its neighbours'
networks, loopback, link-local (169.254.169.254 is cloud metadata), CGNAT, benchmark and multicast."""

Egress = Literal["direct", "none"]
Protocol = Literal["tcp", "udp"]


class NetworkError(Exception):
    """A network step failed; the message has the command and what it said."""


@dataclass(frozen=True, slots=True)
class HostService:
    """A service on the host that guests may reach at the gateway address. ``every_guest``: also a guest
    held to its proxy (TURN, which the stream needs); otherwise only guests with ``direct`` egress."""

    protocol: Protocol
    port: int
    every_guest: bool = False


@dataclass(frozen=True, slots=True)
class GuestEgress:
    """What one guest may reach beyond the services every guest may (per-guest egress only).

    ``direct``: everything a guest reaches without per-guest egress (host services, DNS, public
    addresses). ``proxy``: only ``proxy`` (address, TCP port), and DNS when ``dns`` (a proxy known by
    name). ``none``: nothing more."""

    mode: Literal["direct", "proxy", "none"]
    proxy: tuple[ipaddress.IPv4Address, int] | None = None
    dns: bool = False


@dataclass(frozen=True, slots=True)
class MediaNat:
    """An operator's public address whose UDP ports ``port_min``..``port_max`` map 1:1 to browser
    guests' streamers (``guest_port``, the same in every guest)."""

    public_ip: ipaddress.IPv4Address
    port_min: int
    port_max: int
    guest_port: int = 40000


@dataclass(frozen=True, slots=True)
class MediaMap:
    """One guest's mapping: ``public_ip:public_port`` (udp) reaches ``guest_address:guest_port``."""

    public_ip: ipaddress.IPv4Address
    public_port: int
    guest_address: ipaddress.IPv4Address
    guest_port: int


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    scope: str
    subnet: ipaddress.IPv4Network
    egress: Egress = "direct"
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    host_services: tuple[HostService, ...] = ()
    per_guest: bool = False
    """Each guest reaches only what :meth:`SandboxNetwork.set_egress` gives its link (proxy pools)."""
    media: MediaNat | None = None
    """A UDP port of a public address per browser guest, for WebRTC without TURN; ``None``: TURN only."""

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def anchor(self) -> str:
        """The interface that holds the gateway address: an empty bridge (always built in, unlike the
        dummy device), so services can bind to the gateway before any sandbox exists."""
        return f"bvm-{self.scope}"[:15]

    @property
    def table(self) -> str:
        return f"browservm_{self.scope}"

    @property
    def netns_prefix(self) -> str:
        return f"bvm-{self.scope}-"

    @property
    def interface_prefix(self) -> str:
        """Host ends of this controller's guest links start with it (the policy matches on it, so
        another controller's rules on the same host never apply to these guests, nor ours to theirs)."""
        return f"v{self.scope[:6]}-"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One sandbox's place on the network (what the backend needs to put the guest there)."""

    netns: str
    host_interface: str
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    mac: str
    dns: tuple[ipaddress.IPv4Address, ...]

    def spec(self) -> NetworkSpec:
        """What a backend is told (``SandboxSpec.network``)."""
        return NetworkSpec(
            netns=self.netns,
            address=str(self.address),
            gateway=str(self.gateway),
            mac=self.mac,
            dns=[str(server) for server in self.dns],
        )


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered MAC that says which address it carries (02:42 and the four bytes)."""
    return "02:42:" + ":".join(f"{byte:02x}" for byte in address.packed)


class SandboxNetwork:
    """This controller's sandbox network on this host."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self._host_ready = False
        self._lock = asyncio.Lock()
        self._granted: dict[str, list[str]] = {}
        self._mapped: dict[str, list[str]] = {}
        """Per sandbox, the set and map elements of its media mapping (``map_media``)."""
        """Per sandbox, the set elements its link was given (``set_egress``), to take back exactly."""

    def media_map_for(self, address: ipaddress.IPv4Address) -> MediaMap | None:
        """The mapping a guest at ``address`` gets: the port at its address's place in the subnet (the
        lowest addresses are leased first), ``None`` without a public address or past the port range."""
        media = self.config.media
        if media is None:
            return None
        port = media.port_min + int(address) - int(self.config.gateway) - 1
        if not media.port_min <= port <= media.port_max:
            return None
        return MediaMap(media.public_ip, port, address, media.guest_port)

    def netns_of(self, sandbox_id: str) -> str:
        return f"{self.config.netns_prefix}{sandbox_id}"

    def interface_of(self, sandbox_id: str) -> str:
        digest = hashlib.sha256(f"{self.config.scope}/{sandbox_id}".encode()).hexdigest()
        return f"{self.config.interface_prefix}{digest[:7]}"  # 15 characters, the kernel's limit

    def guest_addresses(self) -> ipaddress.IPv4Network:
        return self.config.subnet

    # ------------------------------------------------------------------ the host side

    async def ensure_host(self) -> None:
        """The gateway address and the policy table, created once (idempotent, also after a restart)."""
        async with self._lock:
            if self._host_ready:
                return
            config = self.config
            if not await _run_ok("ip", "link", "show", "dev", config.anchor):
                await _run("ip", "link", "add", config.anchor, "type", "bridge")
                await _run("ip", "link", "set", config.anchor, "addrgenmode", "none")
            await _run("ip", "address", "replace", f"{config.gateway}/32", "dev", config.anchor)
            await _run("ip", "link", "set", config.anchor, "up")
            if config.egress == "direct" or config.per_guest or config.media is not None:
                # Forwarding is a property of this network namespace (the host's, in production).
                await _run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            await _nft(self._table_script())
            self._granted.clear()  # the new table holds no grant
            self._mapped.clear()
            self._host_ready = True
            log.info(
                "network.ready", gateway=str(config.gateway), subnet=str(config.subnet), egress=config.egress
            )

    def _table_script(self) -> str:
        config = self.config
        guests = f'"{config.interface_prefix}*"'
        services = ", ".join(f"{s.protocol} . {s.port}" for s in config.host_services)
        shared = ", ".join(f"{s.protocol} . {s.port}" for s in config.host_services if s.every_guest)
        dns = ", ".join(str(a) for a in config.dns)
        lines = [
            f"table inet {config.table}",
            f"delete table inet {config.table}",
            f"table inet {config.table} {{",
            "  set private4 { type ipv4_addr; flags interval; elements = { " + ", ".join(PRIVATE) + " } }",
        ]
        if services:
            lines.append(
                f"  set host_services {{ type inet_proto . inet_service; elements = {{ {services} }} }}"
            )
        if dns:
            lines.append(f"  set dns4 {{ type ipv4_addr; elements = {{ {dns} }} }}")
        if config.per_guest:
            lines += [
                "  set direct_guests { type ifname; }",
                "  set dns_guests { type ifname; }",
                "  set proxy_allow { type ifname . ipv4_addr . inet_service; }",
            ]
            if shared:
                lines.append(
                    f"  set every_guest_services {{ type inet_proto . inet_service; elements = {{ {shared} }} }}"
                )
        if config.media is not None:
            lines += [
                "  map media_dnat { type inet_service : ipv4_addr . inet_service; }",
                "  set media_guests { type ipv4_addr . inet_service; }",
            ]
        lines += [
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f"    iifname {guests} jump guest_to_host",
            "  }",
            "  chain guest_to_host {",
            "    ct state established,related accept",
            "    meta nfproto ipv6 drop",
        ]
        if config.per_guest:
            lines.append("    meta l4proto tcp iifname . ip daddr . tcp dport @proxy_allow accept")
            if shared:
                lines.append(
                    f"    ip daddr {config.gateway} meta l4proto . th dport @every_guest_services accept"
                )
            lines.append("    iifname != @direct_guests counter drop")
        if services:
            lines.append(f"    ip daddr {config.gateway} meta l4proto . th dport @host_services accept")
        lines += [
            "    counter drop",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    iifname {guests} jump guest_out",
            f"    oifname {guests} ct state established,related accept",
        ]
        if config.media is not None:
            # Only what the mapping rewrote: a packet sent to the guest's own address stays dropped.
            lines.append(f"    oifname {guests} ct status dnat ip daddr . udp dport @media_guests accept")
        lines += [
            f"    oifname {guests} counter drop",
            "  }",
            "  chain guest_out {",
            "    ct state established,related accept",
            "    meta nfproto ipv6 drop",
            f"    oifname {guests} counter drop",
        ]
        if config.per_guest:
            lines.append("    meta l4proto tcp iifname . ip daddr . tcp dport @proxy_allow accept")
            if dns:
                lines.append(
                    "    iifname @dns_guests ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept"
                )
            lines.append("    iifname != @direct_guests counter drop")
        if dns:
            lines.append("    ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept")
        lines += ["    ip daddr @private4 counter drop"]
        lines += ["    accept" if config.egress == "direct" else "    counter drop"]
        lines += ["  }"]
        if config.media is not None:
            lines += [
                "  chain prerouting {",
                "    type nat hook prerouting priority dstnat; policy accept;",
                f"    ip daddr {config.media.public_ip} dnat ip to udp dport map @media_dnat",
                "  }",
            ]
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    ip saddr {config.subnet} oifname != {guests} masquerade",
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ sandboxes

    async def attach(self, sandbox_id: str, address: ipaddress.IPv4Address) -> Attachment:
        """Create the sandbox's namespace and link, with ``address`` (from the store's pool)."""
        await self.ensure_host()
        if address not in self.config.subnet or address in (
            self.config.gateway,
            self.config.subnet.network_address,
        ):
            raise NetworkError(f"{address} is not a guest address of {self.config.subnet}")
        netns, interface = self.netns_of(sandbox_id), self.interface_of(sandbox_id)
        gateway, mac = self.config.gateway, mac_for(address)
        try:
            await _run("ip", "netns", "add", netns)
            # IPv4 only: no link has an IPv6 address the other side could reach (the policy is IPv4's),
            # and the host's end coming up changes no address on the host, which is what tells every
            # program there that watches the network (a browser aborts its requests) that it changed.
            await _run(
                "ip",
                "netns",
                "exec",
                netns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            )
            await _run("ip", "link", "add", interface, "type", "veth", "peer", "name", "eth0", "netns", netns)
            await _batch(
                f"link set {interface} addrgenmode none",
                f"link set {interface} up",
                f"route replace {address}/32 dev {interface} src {gateway}",
            )
            await _batch(
                "link set lo up",
                "link set eth0 addrgenmode none",
                f"link set eth0 address {mac}",
                f"address add {address}/32 dev eth0",
                "link set eth0 up",
                f"route add {gateway} dev eth0 scope link",
                f"route add default via {gateway} dev eth0 onlink",
                netns=netns,
            )
        except BaseException:
            await self.detach(sandbox_id)
            raise
        log.info("network.attached", sandbox_id=sandbox_id, address=str(address), netns=netns)
        return Attachment(netns, interface, address, gateway, mac, self.config.dns)

    async def set_egress(self, sandbox_id: str, egress: GuestEgress) -> None:
        """Give the sandbox's link what ``egress`` says, in place of what it had (one nftables
        transaction: no moment with both or neither). Only with per-guest egress."""
        if not self.config.per_guest:
            raise NetworkError("per-guest egress is off on this network (no proxy pool is configured)")
        await self.ensure_host()
        interface = self.interface_of(sandbox_id)
        table = f"inet {self.config.table}"
        elements: list[str] = []
        if egress.mode == "direct":
            elements.append(f'direct_guests {{ "{interface}" }}')
        elif egress.mode == "proxy":
            if egress.proxy is None:
                raise NetworkError("proxy egress needs the proxy's address and port")
            address, port = egress.proxy
            elements.append(f'proxy_allow {{ "{interface}" . {address} . {port} }}')
            if egress.dns and self.config.dns:
                elements.append(f'dns_guests {{ "{interface}" }}')
        async with self._lock:
            previous = self._granted.pop(sandbox_id, [])
            script = [f"delete element {table} {e}" for e in previous]
            script += [f"add element {table} {e}" for e in elements]
            if script:
                await _nft("\n".join(script) + "\n")
            self._granted[sandbox_id] = elements
        log.info(
            "network.egress", sandbox_id=sandbox_id, mode=egress.mode,
            proxy=f"{egress.proxy[0]}:{egress.proxy[1]}" if egress.proxy else None,
        )  # fmt: skip

    async def map_media(self, sandbox_id: str, address: ipaddress.IPv4Address) -> MediaMap | None:
        """Map the guest's public UDP port to its streamer (idempotent: a controller's start rebuilt the
        table and maps the live guests again). ``None`` when there is no mapping for it (TURN only)."""
        mapping = self.media_map_for(address)
        if mapping is None:
            return None
        await self.ensure_host()
        table = f"inet {self.config.table}"
        elements = [
            f"media_dnat {{ {mapping.public_port} : {address} . {mapping.guest_port} }}",
            f"media_guests {{ {address} . {mapping.guest_port} }}",
        ]
        async with self._lock:
            previous = self._mapped.pop(sandbox_id, [])
            script = [f"delete element {table} {e}" for e in previous]
            script += [f"add element {table} {e}" for e in elements]
            await _nft("\n".join(script) + "\n")
            self._mapped[sandbox_id] = elements
        log.info(
            "network.media_mapped", sandbox_id=sandbox_id,
            public=f"{mapping.public_ip}:{mapping.public_port}", guest=f"{address}:{mapping.guest_port}",
        )  # fmt: skip
        return mapping

    async def _unmap(self, sandbox_id: str) -> None:
        previous = self._mapped.pop(sandbox_id, [])
        if previous:
            table = f"inet {self.config.table}"
            with contextlib.suppress(NetworkError):
                await _nft("".join(f"delete element {table} {e}\n" for e in previous))

    async def _revoke(self, sandbox_id: str) -> None:
        previous = self._granted.pop(sandbox_id, [])
        if previous:
            table = f"inet {self.config.table}"
            with contextlib.suppress(NetworkError):
                await _nft("".join(f"delete element {table} {e}\n" for e in previous))

    async def detach(self, sandbox_id: str) -> None:
        """Remove the namespace (and with it the link and its route). Idempotent."""
        await self._revoke(sandbox_id)
        await self._unmap(sandbox_id)
        netns = self.netns_of(sandbox_id)
        if await _run_ok("ip", "netns", "delete", netns):
            log.info("network.detached", sandbox_id=sandbox_id, netns=netns)
        # A half-made attach may have left the host end behind without the namespace.
        await _run_ok("ip", "link", "delete", self.interface_of(sandbox_id))

    async def attached(self) -> set[str]:
        """Sandbox ids that have a namespace here (a crashed controller's among them)."""
        out = await _run("ip", "netns", "list")
        prefix = self.config.netns_prefix
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return {name[len(prefix) :] for name in names if name.startswith(prefix)}

    async def remove_host(self) -> None:
        """Remove the gateway and the policy (tests; a controller keeps them for its next start)."""
        await _run_ok("nft", "delete", "table", "inet", self.config.table)
        await _run_ok("ip", "link", "delete", self.config.anchor)
        self._host_ready = False


# ---------------------------------------------------------------------------------------------- commands


async def _run(*argv: str, stdin: bytes | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(stdin)
    if process.returncode != 0:
        raise NetworkError(
            f"{' '.join(argv)} failed ({process.returncode}): {err.decode(errors='replace').strip()}"
        )
    return out.decode(errors="replace")


async def _run_ok(*argv: str) -> bool:
    try:
        await _run(*argv)
    except NetworkError:
        return False
    return True


async def _batch(*commands: str, netns: str | None = None) -> None:
    """Several ``ip`` commands in one process (in ``netns`` when given)."""
    argv = ["ip", "-batch", "-"] if netns is None else ["ip", "-n", netns, "-batch", "-"]
    await _run(*argv, stdin=("\n".join(commands) + "\n").encode())


async def _nft(script: str) -> None:
    await _run("nft", "-f", "-", stdin=script.encode())


def parse_dns(servers: Sequence[str]) -> tuple[ipaddress.IPv4Address, ...]:
    return tuple(ipaddress.IPv4Address(server) for server in servers)
