"""Watching a command from outside: is it stuck writing to a pipe nobody reads?"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from pathlib import Path

import psutil


def blocked_on_its_pipe(pid: int) -> bool:
    """Whether the process sleeps in a write to a full pipe (its reader stopped reading)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/wchan").read_text().endswith("pipe_write")  # anon_pipe_write on 6.x
    return False


async def process_with_marker(marker: str, among: psutil.Process | None = None) -> psutil.Process:
    """The process started with ``BVM_TEST_MARKER=marker`` in its environment (below ``among``, or any)."""
    async with asyncio.timeout(20):
        while True:
            candidates: Iterable[psutil.Process] = (
                among.children(recursive=True) if among is not None else psutil.process_iter()
            )
            for process in candidates:
                with contextlib.suppress(psutil.Error):
                    if process.environ().get("BVM_TEST_MARKER") == marker:
                        return process
            await asyncio.sleep(0.05)


async def until_blocked(process: psutil.Process, within_s: float = 60) -> int:
    """Wait until ``process`` is stuck writing to its output pipe; the bytes it had written by then."""
    async with asyncio.timeout(within_s):
        written = -1
        while True:
            try:
                now = process.io_counters().write_chars
            except psutil.NoSuchProcess:
                raise AssertionError(
                    "the command ran to its end unread: nothing held its output back"
                ) from None
            if blocked_on_its_pipe(process.pid) and now == written:
                return now
            written = now
            await asyncio.sleep(0.2)
