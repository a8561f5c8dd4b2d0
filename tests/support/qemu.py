"""The QEMU processes of a test's VMs, found as a reconciler would: QEMU runs in its VM's directory."""

from __future__ import annotations

from pathlib import Path

import psutil


def qemu_processes(state_dir: Path) -> list[psutil.Process]:
    """Every QEMU whose working directory is under ``state_dir``."""
    found = []
    for process in psutil.process_iter(["name", "cwd"]):
        if (process.info["name"] or "").startswith("qemu") and str(state_dir) in (process.info["cwd"] or ""):
            found.append(process)
    return found
