"""What both VM backends ask of a host before they run a VM: where the VMM's binary is, what version it
says it is, and which KVM module (if any) gives ``/dev/kvm``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PROBE_TIMEOUT_S = 10.0
"""How long a VMM's binary may take to answer a probe (``--version``) before it counts as broken."""


def resolve(binary: str) -> str | None:
    """A path or a name on PATH, if it is an executable file."""
    if os.sep in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    return shutil.which(binary)


def version_output(binary: str) -> str:
    """What ``binary --version`` prints (stdout then stderr); empty when it cannot run or hangs."""
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout + result.stderr


def kvm_module(modules: Path = Path("/sys/module")) -> str | None:
    """``kvm_intel``, ``kvm_amd``, ``kvm_pvm`` (runs only PVM guest kernels) or ``None``: no KVM here."""
    for name in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if (modules / name).exists():
            return name
    return None
