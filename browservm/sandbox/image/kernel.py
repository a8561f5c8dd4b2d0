"""The VM outputs built from Debian's kernel: ``vmlinuz``, an uncompressed ``vmlinux`` and the initramfs.

Debian's kernel is modular (virtio, ext4 and overlay are modules), so the guest needs an initramfs that
loads them before it can mount its root. It holds busybox (static), the modules listed in
:data:`recipe.GUEST_MODULES` with their dependencies in load order, and ``files/initramfs-init``.
Firecracker boots only an uncompressed ELF kernel: ``vmlinux`` is the bzImage's payload, decompressed
(Debian builds it with XZ); it carries the PVH entry note, so QEMU boots it too.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from browservm.sandbox.image import recipe
from browservm.sandbox.image.errors import ImageBuildError


@dataclass(frozen=True, slots=True)
class KernelFiles:
    release: str
    """``uname -r`` of the guest, e.g. ``6.1.0-57-amd64``."""
    vmlinuz: Path
    config: Path
    modules_dir: Path
    busybox: Path


def find(extracted: Path) -> KernelFiles:
    """The kernel and busybox inside a tree unpacked by :func:`debian.extract_kernel_packages`."""
    kernels = sorted((extracted / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError("kernel", f"expected one kernel in {extracted}/boot, found {len(kernels)}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    busybox = extracted / "bin/busybox"
    if not busybox.is_file():
        raise ImageBuildError("kernel", f"busybox-static unpacked no {busybox}")
    return KernelFiles(
        release=release,
        vmlinuz=kernels[0],
        config=extracted / "boot" / f"config-{release}",
        modules_dir=extracted / "lib/modules" / release,
        busybox=busybox,
    )


# ---------------------------------------------------------------------------------------------- vmlinux


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an x86 bzImage (boot protocol >= 2.08 gives the payload's place)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageBuildError("kernel", "vmlinuz is not an x86 bzImage (no HdrS setup header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ImageBuildError("kernel", f"boot protocol {version:#x} is too old to locate the payload")
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise ImageBuildError(
            "kernel", f"the kernel payload is not XZ (starts {payload[:6]!r}); only XZ is supported"
        )
    try:
        # The payload ends with the uncompressed size (4 bytes) after the XZ stream: the decompressor
        # stops at the end of the stream and leaves it.
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    except lzma.LZMAError as exc:
        raise ImageBuildError("kernel", f"cannot decompress the kernel payload: {exc}") from None
    if not elf.startswith(b"\x7fELF"):
        raise ImageBuildError("kernel", "the decompressed kernel is not an ELF file")
    return elf


def version_banner(vmlinux: bytes) -> str:
    """``Linux version ... Debian 6.1.192-3 (...)``: the kernel's own statement of its version."""
    match = re.search(rb"Linux version [^\n\x00]+", vmlinux)
    return match[0].decode(errors="replace").strip() if match else "unknown"


# ---------------------------------------------------------------------------------------------- modules


def module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def load_order(modules_dir: Path, wanted: tuple[str, ...], *, log: Path) -> list[tuple[str, Path]]:
    """``(name, file)`` of each wanted module and its dependencies, every module after what it needs."""
    subprocess.run(
        ["depmod", "-b", str(modules_dir.parents[2]), modules_dir.name],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        check=True,
    )
    deps: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, needed = line.partition(":")
        name = module_name(target)
        files[name] = modules_dir / target
        deps[name] = [module_name(dep) for dep in needed.split()]
    builtin = {module_name(line) for line in (modules_dir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name not in files:
            raise ImageBuildError(
                "kernel", f"module {name} (needed by {' -> '.join(path) or 'the recipe'}) not found"
            )
        for dep in deps[name]:
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [(name, files[name]) for name in order]


# ---------------------------------------------------------------------------------------------- initramfs


class Cpio:
    """A ``newc`` cpio archive, the initramfs format, written with fixed owners and times (reproducible)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self._inode += 1
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self._out.write(header + name.encode() + b"\0")
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self._out.getvalue(), compresslevel=9, mtime=0)


def initramfs(kernel: KernelFiles, modules: list[tuple[str, Path]], init_script: bytes) -> bytes:
    archive = Cpio()
    for directory in ("bin", "dev", "lib", "lib/modules", f"lib/modules/{kernel.release}", "proc", "sys"):
        archive.directory(directory)
    # The kernel opens /dev/console for the init's output before anything is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("init", init_script, 0o755)
    archive.file("bin/busybox", kernel.busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    for name, path in modules:
        archive.file(f"lib/modules/{kernel.release}/{name}.ko", path.read_bytes())
    archive.file("lib/modules/release", f"{kernel.release}\n".encode())
    archive.file("lib/modules/load-order", "".join(f"{name}\n" for name, _ in modules).encode())
    return archive.gzipped()


def busybox_version(busybox: Path) -> str:
    result = subprocess.run([str(busybox)], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def build(extracted: Path, layer: Path, *, log: Path) -> dict[str, str]:
    """Write ``vmlinuz``, ``vmlinux``, ``initramfs.img`` and ``config`` into ``layer``; returns versions."""
    kernel = find(extracted)
    modules = load_order(kernel.modules_dir, recipe.GUEST_MODULES, log=log)
    layer.mkdir(parents=True, exist_ok=True)
    bzimage = kernel.vmlinuz.read_bytes()
    vmlinux = extract_vmlinux(bzimage)
    (layer / "vmlinuz").write_bytes(bzimage)
    (layer / "vmlinux").write_bytes(vmlinux)
    (layer / "config").write_bytes(kernel.config.read_bytes())
    init_script = (recipe.files() / "initramfs-init").read_bytes()
    (layer / "initramfs.img").write_bytes(initramfs(kernel, modules, init_script))
    return {
        "release": kernel.release,
        "linux": version_banner(vmlinux),
        "busybox": busybox_version(kernel.busybox),
        "modules": " ".join(name for name, _ in modules),
    }
