"""The one privileged part of a VM guest: what its host tells it after a snapshot is restored.

A VM restored from a snapshot wakes up as the machine that was saved: the template's sandbox id, its
network address and MAC, a clock that stopped when the snapshot was taken, and a kernel random generator
in the very state every other clone of that snapshot shares. The agent cannot put any of that right: it
runs unprivileged, with no capabilities. So the VM's init starts this small helper as root before it drops
privileges, on a channel of its own that only the host can write to (a second virtio-serial port, or a
vsock port, which the init leaves to root). It does four things and nothing else, each from a value it
checks:

* sets the wall clock (``clock_settime``): TLS certificates, OAuth ``exp`` and the agent's expiry need
  the real time;
* mixes the host's fresh random bytes into the kernel's pool and reseeds its generator at once
  (``RNDADDENTROPY`` then ``RNDRESEEDCRNG``), so that clones of one snapshot draw different numbers from
  ``getrandom`` from here on;
* gives ``eth0`` the clone's own MAC, address and routes (with ``ip``), as the controller allocated them;
* writes the clone's sandbox id to ``/run/browservm/identity``, which the agent reads before each Hello.

The wire format is one JSON object per line: the host sends :class:`Rebirth`'s fields with a ``nonce``,
the helper answers ``{"nonce": ..., "ok": true}`` or ``{"nonce": ..., "ok": false, "error": ...}``. It
applies the same message twice harmlessly (the host resends when a line was lost across the restore).

This module runs with the guest image's own Python and imports only the standard library and the
guest's listeners.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import fcntl
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PORT_NAME = "org.browservm.host"
"""The virtio-serial port QEMU names for this channel (the agent's is ``org.browservm.agent``)."""
IDENTITY_FILE = Path("/run/browservm/identity")
DEVICE = "eth0"
RNDADDENTROPY = 0x40085203
"""``_IOW('R', 0x03, int[2])``: add bytes to the input pool, crediting them."""
RNDRESEEDCRNG = 0x5207
"""``_IO('R', 0x07)``: reseed the generator from the input pool now, not at its next interval."""
MAX_LINE = 4096
SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class BadMessage(ValueError):
    """A message this helper will not act on; the host is told why."""


@dataclass(frozen=True, slots=True)
class Network:
    address: ipaddress.IPv4Address
    prefix_len: int
    gateway: ipaddress.IPv4Address
    mac: str


@dataclass(frozen=True, slots=True)
class Rebirth:
    sandbox_id: str | None
    time_ns: int
    entropy: bytes
    network: Network | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Rebirth:
        sandbox_id = raw.get("sandbox_id")
        if sandbox_id is not None and not (isinstance(sandbox_id, str) and SANDBOX_ID.fullmatch(sandbox_id)):
            raise BadMessage("sandbox_id must be 1-64 letters, digits, '_' or '-'")
        time_ns = raw.get("time_ns")
        if not isinstance(time_ns, int) or time_ns <= 0:
            raise BadMessage("time_ns must be a positive integer")
        try:
            entropy = base64.b64decode(str(raw.get("entropy", "")), validate=True)
        except binascii.Error as exc:
            raise BadMessage(f"entropy is not base64: {exc}") from None
        if not 32 <= len(entropy) <= 512:
            raise BadMessage("entropy must be 32 to 512 bytes")
        network = None
        if (net := raw.get("network")) is not None:
            if not isinstance(net, dict):
                raise BadMessage("network must be an object")
            try:
                address = ipaddress.IPv4Address(net["address"])
                gateway = ipaddress.IPv4Address(net["gateway"])
                prefix_len = int(net["prefix_len"])
            except (KeyError, ValueError, TypeError) as exc:
                raise BadMessage(f"network is not a usable IPv4 network: {exc}") from None
            mac = str(net.get("mac", "")).lower()
            if not 1 <= prefix_len <= 32 or not MAC.fullmatch(mac):
                raise BadMessage("network needs a prefix length of 1-32 and a MAC aa:bb:cc:dd:ee:ff")
            network = Network(address, prefix_len, gateway, mac)
        return cls(sandbox_id, time_ns, entropy, network)


def apply(message: Rebirth, identity_file: Path = IDENTITY_FILE) -> None:
    """Clock, entropy, network, identity: in that order (the rest may log times and draw randomness)."""
    time.clock_settime_ns(time.CLOCK_REALTIME, message.time_ns)
    reseed(message.entropy)
    if message.network is not None:
        readdress(message.network)
    if message.sandbox_id is not None:
        identity_file.parent.mkdir(parents=True, exist_ok=True)
        staged = identity_file.with_suffix(".new")
        staged.write_text(json.dumps({"sandbox_id": message.sandbox_id}) + "\n")
        staged.chmod(0o644)
        os.replace(staged, identity_file)


def reseed(entropy: bytes) -> None:
    with open("/dev/random", "wb", buffering=0) as device:
        request = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fcntl.ioctl(device, RNDADDENTROPY, request)
        fcntl.ioctl(device, RNDRESEEDCRNG)


def readdress(network: Network) -> None:
    """``eth0`` as the initramfs sets it up at boot (``ip=``), for the clone's own allocation."""
    commands = [
        f"link set dev {DEVICE} address {network.mac}",
        f"address flush dev {DEVICE}",
        f"address add {network.address}/{network.prefix_len} dev {DEVICE}",
    ]
    if network.prefix_len == 32:
        commands.append(f"route replace {network.gateway} dev {DEVICE} scope link")
    commands.append(f"route replace default via {network.gateway} dev {DEVICE}")
    done = subprocess.run(
        ["ip", "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        raise OSError(f"ip: {done.stderr.strip() or done.returncode}")


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        reply: dict[str, Any] = {"ok": True}
        try:
            raw = json.loads(line[:MAX_LINE])
            if not isinstance(raw, dict):
                raise BadMessage("a message is a JSON object")
            reply["nonce"] = raw.get("nonce")
            message = Rebirth.parse(raw)
            await asyncio.to_thread(apply, message)
            print(
                f"browservm-identity: applied: sandbox {message.sandbox_id or '(same)'}, clock set, "
                f"reseeded{', ' + str(message.network.address) if message.network else ''}",
                flush=True,
            )
        except (BadMessage, ValueError, OSError, subprocess.SubprocessError) as exc:
            reply.update(ok=False, error=str(exc) or type(exc).__name__)
            print(f"browservm-identity: refused: {reply['error']}", flush=True)
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


async def run(listen: str) -> None:
    from browservm.guest.listener import listener_for

    listener = listener_for(listen)
    await listener.start(serve_connection)
    print(f"browservm-identity: listening on {listen}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m browservm.guest.identity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--listen", default=f"serial:/dev/virtio-ports/{PORT_NAME}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("browservm-identity: must run as root (it sets the clock and the network)", file=sys.stderr)
        return 2
    asyncio.run(run(args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
