"""What a host needs to run Firecracker, checked for real: the binary and its version, and KVM.

Firecracker runs only on hardware virtualization: ``/dev/kvm`` from ``kvm_intel`` or ``kvm_amd``. A PVM
host (``kvm_pvm``, as the development machines are) has ``/dev/kvm`` but cannot run Firecracker's guests.
Firecracker's vsock device is emulated in the VMM and bridged to unix sockets, so it does not open
``/dev/vhost-vsock``; that device is reported (QEMU's vhost-vsock needs it) but not required.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from browservm.sandbox.vmhost import kvm_module, resolve, version_output
from browservm.settings import Settings

WRITTEN_FOR = (1, 16)
"""The driver is written to v1.16.1's API document; older releases lack endpoints and fields it sends."""
_VERSION = re.compile(r"Firecracker v(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True, slots=True)
class FirecrackerHost:
    binary: str | None
    """Resolved path of the firecracker binary, or ``None`` when not found."""
    version: str | None
    kvm_module: str | None
    """``kvm_intel``, ``kvm_amd``, ``kvm_pvm`` or ``None`` (no KVM module found)."""
    kvm_usable: bool
    vhost_vsock: bool
    jailer: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def firecracker_version(binary: str) -> str | None:
    """``firecracker --version`` prints ``Firecracker v1.16.1`` (then a blank line)."""
    match = _VERSION.search(version_output(binary))
    return match.group(0).removeprefix("Firecracker ") if match else None


def inspect(
    settings: Settings,
    *,
    kvm: Path = Path("/dev/kvm"),
    modules: Path = Path("/sys/module"),
    vhost_vsock: Path = Path("/dev/vhost-vsock"),
) -> FirecrackerHost:
    problems: list[str] = []
    binary = resolve(settings.firecracker_bin)
    version = None
    if binary is None:
        problems.append(
            f"firecracker binary {settings.firecracker_bin!r} not found or not executable (it is in neither "
            "Debian nor PyPI): install the v1.16.1 release binary and set BROWSERVM_FIRECRACKER_BIN"
        )
    else:
        version = firecracker_version(binary)
        if version is None:
            problems.append(f"{binary} --version did not print 'Firecracker vX.Y.Z': is it firecracker?")
        elif tuple(int(part) for part in version.lstrip("v").split(".")[:2]) < WRITTEN_FOR:
            problems.append(
                f"{binary} is Firecracker {version}; the driver is written to v1.16.1's API: install v1.16.1"
            )
    module = kvm_module(modules)
    usable = kvm.exists() and os.access(kvm, os.R_OK | os.W_OK)
    if not kvm.exists():
        problems.append(f"{kvm} does not exist: Firecracker needs KVM (load kvm_intel or kvm_amd)")
    elif not usable:
        problems.append(f"{kvm} exists but this user cannot open it read-write: add the user to group kvm")
    elif module == "kvm_pvm":
        problems.append(
            f"{kvm} is PVM only (kvm_pvm): Firecracker cannot run here; use a host with kvm_intel or "
            "kvm_amd (bare metal, or a VM with nested virtualization), or BROWSERVM_BACKEND=qemu"
        )
    elif module is None:
        problems.append(f"{kvm} is present but neither kvm_intel nor kvm_amd is loaded")
    jailer = None
    if settings.firecracker_jailer_bin:
        jailer = resolve(settings.firecracker_jailer_bin)
        if jailer is None:
            problems.append(
                f"jailer {settings.firecracker_jailer_bin!r} not found or not executable: install the jailer "
                "of the same release as firecracker, or unset BROWSERVM_FIRECRACKER_JAILER_BIN"
            )
    return FirecrackerHost(
        binary=binary,
        version=version,
        kvm_module=module,
        kvm_usable=usable,
        vhost_vsock=vhost_vsock.exists(),
        jailer=jailer,
        problems=problems,
    )
