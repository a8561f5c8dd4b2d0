"""A VM's writable disk: a sparse ext4 file beside the image's read-only root.

Both VM backends give the guest the image's ext4 read-only as its root (``/dev/vda``) and this second,
per-sandbox drive (``/dev/vdb``) that its initramfs mounts as the upper layer of an overlay, so that
everything the guest writes (a CLI VM's home among it) lands here. Firecracker has no copy-on-write disk
format; QEMU has (qcow2), but the same plain drive keeps one guest image and one init for both, and a
hibernated VM's disk state is this one file. It is formatted on the host so the guest's init needs no
``mkfs``; lazy inode tables keep that to a fraction of a second and the file sparse.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

MKFS = "mkfs.ext4"


class DiskError(Exception):
    pass


async def create_overlay(path: Path, size_mib: int, *, owner: int | None = None) -> None:
    """A sparse ext4 of ``size_mib`` at ``path`` (which must not exist), owned by ``owner`` (a uid) if given."""
    with path.open("xb") as file:
        os.ftruncate(file.fileno(), size_mib * 1024 * 1024)
    try:
        process = await _mkfs(path)
    except FileNotFoundError as exc:
        raise DiskError(f"{MKFS} not found: apt-get install e2fsprogs") from exc
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise DiskError(
            f"{MKFS} {path} failed: {stderr.decode(errors='replace').strip()} (apt-get install e2fsprogs)"
        )
    if owner is not None:
        os.chown(path, owner, owner)


async def _mkfs(path: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        MKFS,
        "-q",
        "-F",
        "-L",
        "overlay",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
