"""What a host gives QEMU: the binary, and whether KVM can run a standard guest kernel (else TCG).

KVM runs the image's Debian kernel only with hardware virtualization: ``/dev/kvm`` from ``kvm_intel`` or
``kvm_amd``. A PVM host (``kvm_pvm``, as the development machines are) has ``/dev/kvm`` too, but a
standard kernel hangs under it right after real-mode setup (``../shared/research/vms.md``), so there the
backend uses TCG, QEMU's software emulation: slower by an order of magnitude, but a real VM.
``BROWSERVM_QEMU_ACCEL`` overrides the choice (``kvm`` on a PVM host hangs the guest: for experiments).
"""

from __future__ import annotations

import grp
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from browservm.sandbox.vmhost import PROBE_TIMEOUT_S, kvm_module, resolve, version_output

Accel = Literal["kvm", "tcg"]
_VERSION = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True, slots=True)
class QemuHost:
    binary: str | None
    version: str | None
    accel: Accel
    """What VMs will run under: the setting, or what the host allows."""
    why: str
    """Why that accelerator, in a sentence (logged at start, shown by doctor and /readyz)."""
    kvm_group: int | None = None
    """A group that may open ``/dev/kvm`` (given to QEMU's unprivileged user), if one is needed."""
    seccomp: bool = False
    """Whether this QEMU has ``-sandbox`` (seccomp); VMs run with it when it does."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def qemu_version(binary: str) -> str | None:
    match = _VERSION.search(version_output(binary))
    return match.group(1) if match else None


def has_seccomp(binary: str) -> bool:
    """``-sandbox on`` exists only when QEMU was built with libseccomp (Debian's is)."""
    try:
        result = subprocess.run(
            [binary, "-sandbox", "on", "-M", "none", "-display", "none", "-S", "-version"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def choose_accel(
    setting: Literal["auto", "kvm", "tcg"],
    *,
    kvm: Path = Path("/dev/kvm"),
    modules: Path = Path("/sys/module"),
) -> tuple[Accel, str]:
    """The accelerator for ``BROWSERVM_QEMU_ACCEL=setting``, and why."""
    module = kvm_module(modules)
    if setting == "tcg":
        return "tcg", "TCG (software emulation): BROWSERVM_QEMU_ACCEL=tcg"
    if setting == "kvm":
        return "kvm", f"KVM: BROWSERVM_QEMU_ACCEL=kvm (module {module or 'unknown'})"
    if not kvm.exists():
        return "tcg", f"TCG (software emulation): {kvm} does not exist"
    if module in ("kvm_intel", "kvm_amd"):
        return "kvm", f"KVM ({module}: hardware virtualization)"
    if module == "kvm_pvm":
        return "tcg", (
            f"TCG (software emulation): {kvm} is PVM only (kvm_pvm), which runs no standard guest kernel"
        )
    return "tcg", f"TCG (software emulation): {kvm} exists but neither kvm_intel nor kvm_amd is loaded"


def kvm_group(kvm: Path = Path("/dev/kvm")) -> tuple[int | None, str]:
    """The group through which an unprivileged user opens ``kvm``, or why there is none."""
    try:
        info = kvm.stat()
    except OSError as exc:
        return None, f"{kvm}: {exc.strerror}"
    if info.st_mode & stat.S_IROTH and info.st_mode & stat.S_IWOTH:
        return None, ""
    if info.st_mode & stat.S_IRGRP and info.st_mode & stat.S_IWGRP and info.st_gid != 0:
        return info.st_gid, ""
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return None, (
        f"{kvm} is mode {stat.filemode(info.st_mode)} {group}: the VMs' unprivileged users cannot open it; "
        f"make it group kvm, mode 0660 (chgrp kvm {kvm}; chmod 0660 {kvm}, or the udev rule of the "
        "qemu-system packages)"
    )


def inspect(binary_setting: str, accel_setting: Literal["auto", "kvm", "tcg"]) -> QemuHost:
    problems: list[str] = []
    binary = resolve(binary_setting)
    version = None
    seccomp = False
    if binary is None:
        problems.append(
            f"QEMU {binary_setting!r} not found or not executable: apt-get install qemu-system-x86 "
            "(or set BROWSERVM_QEMU_BIN)"
        )
    else:
        version = qemu_version(binary)
        if version is None:
            problems.append(f"{binary} --version did not print 'QEMU emulator version X.Y': is it QEMU?")
        seccomp = has_seccomp(binary)
    accel, why = choose_accel(accel_setting)
    group = None
    if accel == "kvm":
        group, problem = kvm_group()
        if problem:
            problems.append(problem)
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun does not exist: the VMs' network needs TUN/TAP (modprobe tun)")
    return QemuHost(
        binary=binary,
        version=version,
        accel=accel,
        why=why,
        kvm_group=group,
        seccomp=seccomp,
        problems=problems,
    )
