"""What the ``qemu`` backend records of a VM (its ``handle.runtime``) and of a snapshot.

:class:`QemuRuntime` holds the VM's directory, QEMU's pid and start time, its network and the machine it
is (:class:`QemuMachine`: the image files, command line, size, accelerator and uid), and whether it is
hibernated: enough to probe, adopt, resume and destroy it after a controller restart. The backend keeps
a copy in the VM's directory (``sandbox.json``), so a VM the database does not know is removed whole; a
snapshot's is its ``snapshot.json``, whose ``dir`` is the snapshot's directory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from browservm.sandbox.base import RuntimeRecord
from browservm.sandbox.qemu.host import Accel
from browservm.sandbox.qemu.machine import QemuVM, VmConfig, VmFiles, VmImage
from browservm.sandbox.vm_network import VmNetwork


class QemuMachine(BaseModel):
    """The machine a VM is (:class:`~.machine.VmConfig` less its id and network): a hibernated VM and
    a snapshot's clones start on exactly this."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kernel: Path
    rootfs: Path
    initrd: Path | None = None
    cmdline: str
    vcpus: int
    memory_mib: int
    accel: Accel
    uid: int
    groups: tuple[int, ...] = ()
    seccomp: bool = True
    host_port: bool = False
    """Records from before the host port existed have none (and their snapshots resume without)."""
    nic_mac: str | None = None


class QemuRuntime(RuntimeRecord):
    dir: Path
    pid: int | None = None
    """QEMU's pid; ``None`` before it started and while the VM is hibernated."""
    start_time: float | None = None
    channel: Path
    network: VmNetwork | None = None
    config: QemuMachine
    hibernated: bool = False

    @classmethod
    def of(
        cls, files: VmFiles, config: VmConfig, vm: QemuVM | None, *, hibernated: bool = False
    ) -> QemuRuntime:
        return cls(
            dir=files.dir,
            pid=vm.pid if vm else None,
            start_time=vm.start_time if vm else None,
            channel=files.channel,
            network=config.network,
            config=QemuMachine(
                kernel=config.image.kernel,
                rootfs=config.image.rootfs,
                initrd=config.image.initrd,
                cmdline=config.cmdline,
                vcpus=config.vcpus,
                memory_mib=config.memory_mib,
                accel=config.accel,
                uid=config.uid,
                groups=config.groups,
                seccomp=config.seccomp,
                host_port=config.host_port,
                nic_mac=config.nic_mac,
            ),
            hibernated=hibernated,
        )

    @property
    def files(self) -> VmFiles:
        return VmFiles(self.dir)

    def machine(self, sandbox_id: str) -> VmConfig:
        """The machine this record describes (a hibernated VM's, or a snapshot's)."""
        saved = self.config
        return VmConfig(
            sandbox_id=sandbox_id,
            image=VmImage(saved.kernel, saved.rootfs, saved.initrd),
            cmdline=saved.cmdline,
            vcpus=saved.vcpus,
            memory_mib=saved.memory_mib,
            accel=saved.accel,
            network=self.network,
            uid=saved.uid,
            groups=saved.groups,
            seccomp=saved.seccomp,
            host_port=saved.host_port,
            nic_mac=saved.nic_mac,
        )
