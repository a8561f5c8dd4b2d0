"""An image's manifest (``manifest.json`` beside its outputs): what it holds, how it was built, how to run it.

The sandbox backends read the agent's command and the paths from here rather than knowing them: the
process backend runs :attr:`AgentCommand.argv` under bubblewrap with ``tree`` as ``/``, the VM backends
boot ``vmlinux``/``vmlinuz`` + ``initramfs.img`` with ``rootfs.ext4`` and append the per-sandbox
parameters to :attr:`ImageManifest.kernel_cmdline`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from browservm.sandbox.image import recipe


class StageRecord(BaseModel):
    name: str
    key: str
    inputs: dict[str, Any]
    built_at: datetime
    seconds: float
    """How long this stage took when it was built (not when it was reused)."""
    packages: dict[str, dict[str, str]] = Field(default_factory=dict)
    """``{"debian"|"python"|"npm"|"node"|"kernel": {name: version}}`` of what the stage installed."""


class AgentCommand(BaseModel):
    """How the agent starts in the tree: as ``user`` (uid 1000) with this environment and these arguments
    followed by ``--sandbox-id ID --role ROLE --listen ADDRESS``."""

    argv: list[str] = Field(
        default_factory=lambda: [
            "python3",
            "-m",
            "browservm.guest.agent",
            "--home",
            recipe.HOME,
            "--run-dir",
            recipe.RUN_DIR,
        ]
    )
    uid: int = recipe.USER_UID
    gid: int = recipe.USER_UID
    home: str = recipe.HOME
    run_dir: str = recipe.RUN_DIR
    env: dict[str, str] = Field(
        default_factory=lambda: {
            "HOME": recipe.HOME,
            "USER": recipe.USER_NAME,
            "LOGNAME": recipe.USER_NAME,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "BROWSERVM_CLI_DIR": recipe.CLI_DIR,
        }
    )

    def command(self, sandbox_id: str, role: str, listen: str) -> list[str]:
        return [*self.argv, "--sandbox-id", sandbox_id, "--role", role, "--listen", listen]


class Output(BaseModel):
    path: str
    """Relative to the image's directory."""
    bytes: int


class ImageManifest(BaseModel):
    format: int = recipe.FORMAT
    variant: recipe.Variant
    key: str
    built_at: datetime
    build_seconds: float
    """Wall time of the build that produced this image (stages reused from the cache cost nothing)."""
    rebuilt: list[str]
    """The stages that build ran; the others came from the cache."""
    step_seconds: dict[str, float] = Field(default_factory=dict)
    """Wall time of each step that build ran (stages and outputs: tree, rootfs, check)."""
    stages: dict[str, StageRecord]
    outputs: dict[str, Output]
    agent: AgentCommand = Field(default_factory=AgentCommand)
    kernel_cmdline: str = "console=ttyS0 panic=-1 reboot=t"
    """The base of the kernel command line under QEMU (Firecracker: ``reboot=k``); a backend appends
    ``browservm.sandbox_id=ID browservm.role=ROLE browservm.listen=ADDRESS`` and, for a network,
    ``ip=ADDR::GW:NETMASK::eth0:off`` (docs/image.md lists every parameter)."""

    def packages(self) -> dict[str, dict[str, str]]:
        merged: dict[str, dict[str, str]] = {}
        for stage in self.stages.values():
            for kind, versions in stage.packages.items():
                merged.setdefault(kind, {}).update(versions)
        return merged
