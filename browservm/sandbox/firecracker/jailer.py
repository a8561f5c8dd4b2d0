"""Firecracker's jailer: how a jailed VM is started and where its files must be.

The jailer (same release as firecracker) creates ``<chroot_base>/firecracker/<id>/root``, copies the
firecracker binary in, creates ``/dev/kvm`` and ``/dev/net/tun`` there, joins the network namespace,
pivots into the chroot, drops to ``uid:gid`` and execs firecracker. Every path given to the API is then
relative to that root, so the driver hard-links the image's kernel, initrd and root file system into it
and keeps the VM's own files (overlay, sockets, console, snapshots) there. Without ``--daemonize`` and
``--new-pid-ns`` the jailer's pid becomes firecracker's, so the driver tracks one process either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Jailer:
    binary: str
    uid: int
    gid: int
    chroot_base: Path

    def jail_dir(self, firecracker: str, vm_id: str) -> Path:
        """``<chroot_base>/<exec file name>/<id>``: removed whole when the VM is destroyed."""
        return self.chroot_base / Path(firecracker).name / vm_id

    def argv(self, firecracker: str, vm_id: str, netns: str, firecracker_args: list[str]) -> list[str]:
        """The jailer passes ``--id`` on to firecracker itself; ``firecracker_args`` follow ``--``."""
        return [
            self.binary,
            "--id", vm_id,
            "--exec-file", firecracker,
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", str(self.chroot_base),
            "--netns", f"/var/run/netns/{netns}",
            "--",
            *firecracker_args,
        ]  # fmt: skip

    def prepare(self, root: Path, links: dict[str, Path]) -> None:
        """Make ``root`` ready for a (re)start: the image's files linked in, the jailer's leftovers gone.

        The jailer refuses to start when ``/dev/kvm`` or ``/dev/net/tun`` already exist in the chroot
        (mknod: File exists), as they do after a hibernated VM's process was stopped.
        """
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "dev", ignore_errors=True)
        for name, source in links.items():
            target = root / name
            if target.exists():
                continue
            try:
                os.link(source, target)
            except OSError as exc:
                # A hard link needs one file system; a copy of a GiB root file system is slow but works.
                log.warning("firecracker.jail_copy", source=str(source), target=str(target), error=str(exc))
                shutil.copyfile(source, target)
        # The VM's own files become the jailed user's; the linked image files share their inode with the
        # image and stay as they are (readable is enough: they are opened read-only).
        for entry in [root, *(path for path in root.iterdir() if path.name not in links)]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(entry, self.uid, self.gid, follow_symlinks=False)
