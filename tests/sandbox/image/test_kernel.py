"""Taking the ELF kernel out of a bzImage (Firecracker boots only that)."""

from __future__ import annotations

import lzma
import struct

import pytest

from browservm.sandbox.image.errors import ImageBuildError
from browservm.sandbox.image.kernel import extract_vmlinux, version_banner


def bzimage(
    payload: bytes, *, magic: bytes = b"HdrS", protocol: int = 0x20F, setup_sectors: int = 3
) -> bytes:
    """A bzImage's shape: setup sectors with the header, then the protected-mode part holding the payload."""
    setup = bytearray((setup_sectors + 1) * 512)
    setup[0x1F1] = setup_sectors
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, protocol)
    offset = 100  # the decompressor's own code comes first
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\xcc" * 64


def test_the_xz_payload_is_the_elf_kernel() -> None:
    elf = b"\x7fELF" + b"Linux version 6.1.0-test (Debian 6.1.1-1)\x00" + bytes(4096)
    # As the kernel's build appends it: the XZ stream, then its uncompressed size.
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + struct.pack("<I", len(elf))
    extracted = extract_vmlinux(bzimage(payload))
    assert extracted == elf
    assert version_banner(extracted) == "Linux version 6.1.0-test (Debian 6.1.1-1)"


def test_what_is_not_a_bzimage_is_refused() -> None:
    with pytest.raises(ImageBuildError, match="not an x86 bzImage"):
        extract_vmlinux(bzimage(b"", magic=b"XXXX"))
    with pytest.raises(ImageBuildError, match="too old"):
        extract_vmlinux(bzimage(b"", protocol=0x204))


def test_a_payload_other_than_xz_is_named() -> None:
    with pytest.raises(ImageBuildError, match="not XZ"):
        extract_vmlinux(bzimage(b"\x28\xb5\x2f\xfd" + bytes(32)))  # zstd's magic
