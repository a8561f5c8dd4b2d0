"""What one browser sandbox costs in memory: a warm one (Xvfb, Chromium on a blank page, the streamer,
x11vnc and the agent), as the warm pool keeps it, on the process backend.

Sums the proportional set size (PSS: shared pages split between their users) of every process whose
command line or environment names the sandbox's state directory. Not a test: figures depend on the machine.

    .venv/bin/python bench/sandbox_memory.py
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import psutil

from browservm.controller.services import Services
from browservm.settings import Settings


def sandbox_processes(state_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            mentions = str(state_dir) in " ".join(process.info["cmdline"] or [])
            if mentions or any(str(state_dir) in value for value in process.environ().values()):
                found.append(process)
        except psutil.Error:
            continue
    return found


async def main() -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-bench-"))
    settings = Settings(state_dir=state_dir, log_level="warning", log_json=False, max_sandboxes=2)
    services = await Services.start(settings)
    try:
        while services.pool.idle < 1:
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # let Chromium settle after its first paint
        by_name: dict[str, list[int]] = defaultdict(list)
        for process in sandbox_processes(state_dir):
            try:
                by_name[process.name()].append(process.memory_full_info().pss)
            except psutil.Error:
                continue
    finally:
        await services.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"{'process':<20} {'count':>5} {'PSS MiB':>8}")
    for name, sizes in sorted(by_name.items(), key=lambda item: -sum(item[1])):
        print(f"{name:<20} {len(sizes):>5} {sum(sizes) / 2**20:>8.0f}")
    total = sum(sum(sizes) for sizes in by_name.values())
    print(f"{'one warm sandbox':<20} {sum(map(len, by_name.values())):>5} {total / 2**20:>8.0f}")


if __name__ == "__main__":
    asyncio.run(main())
