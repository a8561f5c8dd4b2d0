"""The cost of isolation: what a network of its own costs a sandbox, and what the media path from an
isolated guest costs a viewer (through the host's coturn, or the host's 1:1 UDP mapping).

Three parts (all by default), each printing a table:

* ``network``: attach, map and detach of sandbox networks (namespace, veth, routes, nftables elements),
  timed, and the kernel memory they hold (``Slab`` + ``Percpu`` + ``KernelStack`` of /proc/meminfo,
  before and after attaching ``--sandboxes`` of them).
* ``sandbox``: a browser sandbox on the process backend from create to ready (its services up, as the
  warm pool prepares it) and its processes' memory (PSS), with a network of its own and with none (a
  namespace with only loopback), ``--repeat`` times each.
* ``media``: the whole product with the viewer's Chromium off the host (``tests/web/media_driver.py``
  in namespaces of its own, as ``tests/web/test_media_e2e.py`` runs it), through TURN and through the
  mapping, ``--repeat`` times each: first frame, glass-to-glass (the remote page's background changes
  until the viewer decodes a frame showing it), click-to-focus.

    .venv/bin/python bench/isolation.py [--only network,sandbox,media] [--repeat 3] [--sandboxes 20]

Runs itself in a fresh network namespace (``unshare --net``): nothing is made on the machine's own
interfaces, and everything it makes goes with that namespace. Needs root and the guest image
(``BROWSERVM_IMAGE_DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from sandbox_memory import sandbox_processes

from browservm import protocol
from browservm.controller.pool import SERVICES
from browservm.controller.services import Services
from browservm.logs import configure
from browservm.sandbox import scope_of
from browservm.sandbox.channel import Channel
from browservm.sandbox.network import MediaNat, NetworkConfig, SandboxNetwork
from browservm.settings import Settings

KERNEL_FIELDS = ("Slab", "Percpu", "KernelStack")


def kernel_kib() -> int:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    return sum(values.get(name, 0) for name in KERNEL_FIELDS)


def med(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


# ---------------------------------------------------------------------------------------------- network


async def network_part(count: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    net = SandboxNetwork(
        NetworkConfig(
            scope=scope_of(state),
            subnet=ipaddress.IPv4Network("10.77.0.0/16"),
            media=MediaNat(ipaddress.IPv4Address("198.18.0.1"), 41000, 41999),
        )
    )
    await net.ensure_host()
    base = net.config.subnet.network_address
    attach, mapping, detach = [], [], []
    try:
        await asyncio.sleep(1)
        before = kernel_kib()
        for index in range(count):
            started = time.perf_counter()
            await net.attach(f"b{index}", base + 2 + index)
            attach.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await net.map_media(f"b{index}", base + 2 + index)
            mapping.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(1)
        held = (kernel_kib() - before) / count
        for index in range(count):
            started = time.perf_counter()
            await net.detach(f"b{index}")
            detach.append((time.perf_counter() - started) * 1000)
    finally:
        for sandbox_id in await net.attached():
            await net.detach(sandbox_id)
        await net.remove_host()
        shutil.rmtree(state, ignore_errors=True)
    print(f"\nnetwork of its own, {count} sandboxes (ms: median (min-max))")
    print(f"  attach (namespace, veth, addresses, routes)   {med(attach)}")
    print(f"  media mapping (two nftables elements)          {med(mapping)}")
    print(f"  detach                                         {med(detach)}")
    print(f"  kernel memory held per sandbox network         {held:.0f} KiB ({'+'.join(KERNEL_FIELDS)})")


# ---------------------------------------------------------------------------------------------- sandbox


async def prepared(channel: Channel, request: protocol.Prepare) -> None:
    """Prepare the sandbox as the warm pool does, until every service reports ready."""
    async with channel.subscribe() as events:
        await channel.request(request, timeout_s=120)
        ready: set[str] = set()
        while ready != set(SERVICES):
            event = await asyncio.wait_for(events.get(), 120)
            if event is None:
                raise RuntimeError("the agent went away while its services started")
            if isinstance(event, protocol.ServiceState) and event.state == "ready":
                ready.add(event.service)


async def sandbox_part(repeat: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    settings = Settings(
        state_dir=state,
        log_level="warning",
        log_json=False,
        max_sandboxes=2,
        warm_pool_size=0,
        guest_dns=[],
        reconcile_interval_s=3600,  # the reconciler would end these sandboxes: no session holds them
    )
    services = await Services.start(settings)
    sandboxes, network = services.sandboxes, services.sandboxes.network
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(repeat):
            for label, net in (("own network", network), ("no network (loopback only)", None)):
                sandboxes.network = net
                started = time.perf_counter()
                handle, channel = await sandboxes.start(
                    role="browser", tenant=None, user_id=None, assign=False
                )
                await prepared(channel, services.sessions.prepare_request())
                ready_ms = (time.perf_counter() - started) * 1000
                await asyncio.sleep(3)  # let Chromium settle after its first paint
                pss = 0
                for process in sandbox_processes(state / "sandboxes" / handle.sandbox_id):
                    try:
                        pss += process.memory_full_info().pss
                    except psutil.Error:
                        continue
                await sandboxes.destroy(handle.sandbox_id, "benchmark")
                entry = figures.setdefault(label, {"ready": [], "pss": []})
                entry["ready"].append(ready_ms)
                entry["pss"].append(pss / 2**20)
    finally:
        sandboxes.network = network
        await services.stop()
        if network is not None:
            await network.remove_host()
        shutil.rmtree(state, ignore_errors=True)
    print(f"\nbrowser sandbox, process backend, {repeat} each: median (min-max)")
    print(f"  {'':<28} {'create to ready ms':>22} {'PSS MiB':>16}")
    for label, entry in figures.items():
        print(f"  {label:<28} {med(entry['ready']):>22} {med(entry['pss']):>16}")


# ---------------------------------------------------------------------------------------------- media


def media_part(repeat: int, rounds: int) -> None:
    from tests.web.test_media_e2e import host_and_internet, run_driver

    rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with host_and_internet() as (host, viewer):
        for _ in range(repeat):
            for mapping in ("off", "on"):
                run = run_driver(host, viewer, mapping, rounds=rounds)
                if "latency" not in run:
                    message = (run.get("error") or {}).get("message")
                    print(f"  run with mapping {mapping} failed: {message}\n{run['driver_log'][-2000:]}")
                    continue
                rows[mapping].append(run)
    print(f"\nmedia from an isolated guest, viewer off the host, {repeat} runs each, {rounds} rounds a run")
    header = ("path", "goto→frame ms", "offer→frame ms", "g2g median ms", "g2g p95 ms", "click→focus ms")
    print("  " + " | ".join(f"{h:>15}" for h in header))
    for mapping, label in (("off", "TURN (coturn)"), ("on", "1:1 UDP mapping")):
        runs = rows[mapping]
        cells = [
            label,
            med([r["video"]["goto_to_first_frame_ms"] for r in runs]),
            med([r["video"]["offer_to_first_frame_ms"] for r in runs]),
            med([r["latency"]["glass_to_glass_ms"]["median"] for r in runs]),
            med([r["latency"]["glass_to_glass_ms"]["p95"] for r in runs]),
            med([r["latency"]["click_to_focus_ms"]["median"] for r in runs]),
        ]
        print("  " + " | ".join(f"{c:>15}" for c in cells))
        for r in runs:
            pair = r["video"]["selected_pair"]
            print(
                f"    pair: {pair['local']['type']} -> {pair['remote']['type']} {pair['remote']['address']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="network,sandbox,media")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sandboxes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10, help="glass-to-glass rounds per media run")
    args = parser.parse_args()
    if os.environ.get("BROWSERVM_BENCH_NETNS") != "1":
        if os.geteuid() != 0:
            sys.exit("bench/isolation.py needs root (it makes network namespaces)")
        os.environ["BROWSERVM_BENCH_NETNS"] = "1"
        script = 'ip link set lo up && exec "$@"'
        os.execvp("unshare", ["unshare", "--net", "sh", "-c", script, "sh", sys.executable, *sys.argv])
    configure("warning", json=False)
    parts = set(args.only.split(","))
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if "network" in parts:
        asyncio.run(network_part(args.sandboxes))
    if "sandbox" in parts:
        asyncio.run(sandbox_part(args.repeat))
    if "media" in parts:
        media_part(args.repeat, args.rounds)


if __name__ == "__main__":
    main()
