"""Create-to-ready and host memory per sandbox, for each backend that runs here (process, qemu), booted cold
or restored from a snapshot, with 1, 2, 4 and 8 started at once.

Each sandbox is a CLI sandbox of the minimal guest image on the real sandbox network (a namespace and a
routed link each). "Ready" is the agent's Hello on the channel (for QEMU: a booted VM, or a restored one
that took its own identity). Memory is the proportional set size (PSS) of the sandbox's host processes
right after Hello: the agent's process tree for ``process``, the QEMU process (guest RAM it touched,
device emulation, TCG's code cache) for ``qemu``.

``snapshot`` (QEMU only) boots one VM, saves it (``backend.snapshot``), and restores the N sandboxes from
it at once. The warm pool's figure, a session taking a sandbox that is already up, is a session-level one:
``bench/sessions.py`` measures it. On these machines QEMU runs under TCG (software emulation): read the
ratios, not the absolutes.

Runs itself in a network namespace of its own (as the tests do), as root:

    .venv/bin/python bench/sandbox.py [--counts 1 2 4 8] [--backends process qemu]
        [--modes cold snapshot] [--memory-mib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from browservm import logs
from browservm.sandbox.base import SandboxBackend, SandboxHandle, SandboxSnapshot, SandboxSpec
from browservm.sandbox.image import ImageStore
from browservm.sandbox.process import MARKER_ENV, ProcessBackend, ProcessRuntime
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.qemu.machine import VmImage
from browservm.sandbox.qemu.runtime import QemuRuntime
from tests.support.network import BackendNetwork

BOOT_TIMEOUT_S = 900.0


def pss_mib(backend: SandboxBackend, handle: SandboxHandle) -> float:
    if isinstance(backend, QemuBackend):
        directory = str(handle.runtime_as(QemuRuntime).dir)
    else:
        directory = str(handle.runtime_as(ProcessRuntime).dir)
    total = 0
    for process in psutil.process_iter():
        try:
            if isinstance(backend, QemuBackend):
                mine = process.cwd() == directory and process.name().startswith("qemu")
            else:
                mine = process.environ().get(MARKER_ENV) == directory
            if mine:
                total += process.memory_full_info().pss
        except (psutil.Error, OSError):
            continue
    return total / 2**20


async def ready(
    backend: SandboxBackend, start: Callable[[SandboxSpec], Awaitable[SandboxHandle]], spec: SandboxSpec
) -> tuple[float, SandboxHandle]:
    """Seconds from asking for the sandbox to its agent's Hello."""
    started = time.monotonic()
    handle = await start(spec)
    channel = await backend.connect(handle, timeout_s=BOOT_TIMEOUT_S)
    seconds = time.monotonic() - started
    await channel.close()
    return seconds, handle


async def saved(backend: SandboxBackend, network: BackendNetwork, memory_mib: int) -> SandboxSnapshot:
    """A booted guest, saved: what the ``snapshot`` mode restores from (its boot is not counted)."""
    spec = await network.spec("template", "cli", vcpus=1, memory_mib=memory_mib)
    _seconds, handle = await ready(backend, backend.create, spec)
    await asyncio.sleep(1.0)  # settled, as the pool saves a prepared guest
    return await backend.snapshot(handle)


def make_backend(name: str, state_dir: Path, image_dir: Path) -> SandboxBackend:
    image = ImageStore(image_dir).current("minimal")
    if image is None:
        raise SystemExit(f"no minimal image in {image_dir}: browservm image build --variant minimal")
    if name == "qemu":
        return QemuBackend(state_dir, VmImage(image.vmlinux, image.rootfs, image.initramfs))
    return ProcessBackend(state_dir, image.tree)


async def one_round(
    name: str, mode: str, count: int, memory_mib: int, image_dir: Path
) -> tuple[list[float], list[float]]:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-bench-", dir="/tmp"))
    backend = make_backend(name, state_dir, image_dir)
    network = BackendNetwork(state_dir)
    await network.network.ensure_host()
    try:
        start: Callable[[SandboxSpec], Awaitable[SandboxHandle]] = backend.create
        if mode == "snapshot":
            snapshot = await saved(backend, network, memory_mib)

            async def start(spec: SandboxSpec) -> SandboxHandle:
                return await backend.restore(snapshot, spec)

        specs = [await network.spec(f"b{i}", "cli", vcpus=1, memory_mib=memory_mib) for i in range(count)]
        results = await asyncio.gather(*(ready(backend, start, spec) for spec in specs))
        await asyncio.sleep(1.0)  # a settled guest, not one still writing its first log lines
        return [seconds for seconds, _ in results], [pss_mib(backend, handle) for _, handle in results]
    finally:
        for sandbox_id in await backend.list_orphans([]):
            await backend.destroy_orphan(sandbox_id)
        await backend.prune_snapshots()
        await network.remove()
        shutil.rmtree(state_dir, ignore_errors=True)


async def run(
    backends: list[str], modes: list[str], counts: list[int], memory_mib: int, image_dir: Path
) -> None:
    print(f"host: {os.cpu_count()} CPUs; guest memory {memory_mib} MiB; minimal image from {image_dir}")
    print(f"{'backend':8} {'mode':9} {'at once':>7} {'ready s (median, max)':>22} {'PSS MiB each':>13}")
    for name in backends:
        for mode in modes:
            if mode == "snapshot" and name != "qemu":
                continue  # the process backend takes no snapshots
            for count in counts:
                times, memory = await one_round(name, mode, count, memory_mib, image_dir)
                print(
                    f"{name:8} {mode:9} {count:>7} {statistics.median(times):>12.1f}, {max(times):>7.1f} "
                    f"{statistics.median(memory):>13.0f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["process", "qemu"], choices=["process", "qemu"])
    parser.add_argument("--modes", nargs="+", default=["cold", "snapshot"], choices=["cold", "snapshot"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument(
        "--image-dir",
        type=Path,
        default=Path(
            os.environ.get("BROWSERVM_TEST_IMAGE_DIR") or Path.home() / ".cache/browservm/test-images"
        ),
    )
    args = parser.parse_args()
    if os.environ.get("BROWSERVM_BENCH_NETNS") != "1":
        # Never on the machine's own interfaces: a network namespace of our own, gone when we are.
        os.environ["BROWSERVM_BENCH_NETNS"] = "1"
        os.execvp("unshare", ["unshare", "--net", "--", sys.executable, *sys.argv])
    os.system("ip link set lo up")
    logs.configure("warning", json=False)  # the table, not the backends' info lines
    asyncio.run(run(args.backends, args.modes, args.counts, args.memory_mib, args.image_dir))


if __name__ == "__main__":
    main()
