"""Sandboxes: one interface (:mod:`browservm.sandbox.base`), several backends."""

from __future__ import annotations

import hashlib
from pathlib import Path

from browservm.sandbox.base import Resources, Role, SandboxBackend
from browservm.settings import Settings, SettingsError


def scope_of(state_dir: Path) -> str:
    """Names the host-wide resources of the controller of ``state_dir`` (cgroups, network namespaces,
    the nftables table), so that two controllers on one host never touch each other's."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def make_backend(settings: Settings) -> SandboxBackend:
    if settings.backend == "process":
        from browservm.sandbox.image import current_tree
        from browservm.sandbox.process import ProcessBackend

        return ProcessBackend(
            settings.state_dir, lambda: current_tree(settings), idle_timeout_s=settings.guest_idle_timeout_s
        )
    if settings.backend == "qemu":
        from browservm.sandbox.qemu import QemuBackend

        return QemuBackend.from_settings(settings)
    if settings.backend == "firecracker":
        from browservm.sandbox.firecracker import FirecrackerBackend

        return FirecrackerBackend.from_settings(settings)
    raise SettingsError(f"BROWSERVM_BACKEND={settings.backend}: use process, qemu or firecracker")


def resources_by_role(settings: Settings) -> dict[Role, Resources]:
    """What each kind of sandbox may use, from the settings."""
    common = {"tasks": settings.sandbox_tasks_max, "tmp_mib": settings.sandbox_tmp_mib}
    return {
        "browser": Resources(vcpus=settings.browser_vcpus, memory_mib=settings.browser_memory_mib, **common),
        "cli": Resources(vcpus=settings.cli_vcpus, memory_mib=settings.cli_memory_mib, **common),
    }
