"""Create-to-ready and host memory per sandbox, for each backend that runs here (process, qemu), with 1, 2
and 4 created at once.

Each sandbox is a CLI sandbox of the minimal guest image on the real sandbox network (a namespace and a
routed link each). "Ready" is the agent's Hello on the channel (for QEMU: a booted VM). Memory is the
proportional set size (PSS) of the sandbox's host processes right after Hello: the agent's process tree
for ``process``, the QEMU process (guest RAM it touched, device emulation, TCG's code cache) for ``qemu``.
On these machines QEMU runs under TCG (software emulation): read the ratios, not the absolutes.

Runs itself in a network namespace of its own (as the tests do), as root:

    .venv/bin/python bench/sandbox.py [--counts 1 2 4] [--backends process qemu] [--memory-mib 512]
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
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from browservm.sandbox.base import SandboxBackend, SandboxHandle
from browservm.sandbox.image import ImageStore
from browservm.sandbox.process import MARKER_ENV, ProcessBackend
from browservm.sandbox.qemu import QemuBackend
from browservm.sandbox.qemu.machine import VmImage
from tests.support.network import BackendNetwork

BOOT_TIMEOUT_S = 600.0


def pss_mib(backend: SandboxBackend, handle: SandboxHandle) -> float:
    directory = handle.runtime["dir"]
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


async def one(
    backend: SandboxBackend, network: BackendNetwork, sandbox_id: str, memory_mib: int
) -> tuple[float, SandboxHandle]:
    spec = await network.spec(sandbox_id, "cli", vcpus=1, memory_mib=memory_mib)
    started = time.monotonic()
    handle = await backend.create(spec)
    channel = await backend.connect(handle, timeout_s=BOOT_TIMEOUT_S)
    seconds = time.monotonic() - started
    await channel.close()
    return seconds, handle


async def run(backends: list[str], counts: list[int], memory_mib: int, image_dir: Path) -> None:
    image = ImageStore(image_dir).current("minimal")
    if image is None:
        raise SystemExit(f"no minimal image in {image_dir}: browservm image build --variant minimal")
    print(f"minimal image {image.path.name}; host: {os.cpu_count()} CPUs; guest memory {memory_mib} MiB")
    print(f"{'backend':8} {'at once':>7} {'ready s (median, max)':>22} {'PSS MiB each (median)':>22}")
    for name in backends:
        for count in counts:
            state_dir = Path(tempfile.mkdtemp(prefix="bvm-bench-", dir="/tmp"))
            backend: SandboxBackend
            if name == "qemu":
                backend = QemuBackend(state_dir, VmImage(image.vmlinux, image.rootfs, image.initramfs))
            else:
                backend = ProcessBackend(state_dir, image.tree)
            network = BackendNetwork(state_dir)
            await network.network.ensure_host()
            try:
                results = await asyncio.gather(
                    *(one(backend, network, f"b{i}", memory_mib) for i in range(count))
                )
                await asyncio.sleep(1.0)  # a settled guest, not one still writing its first log lines
                memory = [pss_mib(backend, handle) for _, handle in results]
                times = [seconds for seconds, _ in results]
                print(
                    f"{name:8} {count:>7} {statistics.median(times):>12.1f}, {max(times):>7.1f} "
                    f"{statistics.median(memory):>22.0f}",
                    flush=True,
                )
            finally:
                for sandbox_id in await backend.list_orphans([]):
                    await backend.destroy(SandboxHandle(sandbox_id, name, "cli", {}))
                await network.remove()
                shutil.rmtree(state_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["process", "qemu"], choices=["process", "qemu"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 2, 4])
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
    asyncio.run(run(args.backends, args.counts, args.memory_mib, args.image_dir))


if __name__ == "__main__":
    main()
