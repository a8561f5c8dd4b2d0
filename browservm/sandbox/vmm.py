"""The VMM process of a VM (QEMU, Firecracker): started here, or adopted after a controller restart.

A pid alone can be reused by an unrelated process once the VMM is gone, so a VMM is known by its pid and
its start time together (both kept in the sandbox's runtime record).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


class VmmProcess:
    """What the QEMU and Firecracker drivers share about their VMM's process: starting, liveness, waiting."""

    def __init__(self, pid: int | None = None, start_time: float | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self._process: subprocess.Popen[bytes] | None = None
        """Set when this controller started the process: it reaps it."""

    def _spawn(
        self, argv: Sequence[str], log_path: Path, *, cwd: Path | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own (the VM outlives a controller that crashes or restarts),
        its output appended to ``log_path``. ``OSError`` when it cannot be started."""
        with log_path.open("ab") as output:
            process = self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env},
            )
        self.pid = self._process.pid
        try:
            self.start_time = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            self.start_time = None
        return process

    def alive(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            return False
        if self.pid is None or self.start_time is None:
            return False
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.start_time and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _wait_gone(self, timeout_s: float) -> None:
        """Wait (blocking) until the VMM has exited: reaped when started here, else watched by pid
        (not psutil's wait: a process of another parent stays a zombie until that parent reaps it)."""
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
