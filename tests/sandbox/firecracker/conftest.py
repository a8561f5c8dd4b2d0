"""Fixtures for the Firecracker driver's contract tests: the API document, the stand-in VMM, a network
namespace with a name of our own, and guest image files for the stand-in to open."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.firecracker.contract import DOCUMENT_NAME, Contract, document_path

STANDIN = Path(__file__).with_name("standin.py")
NETNS_PREFIX = "bvmfc-"


@pytest.fixture(scope="session")
def api_document() -> Path:
    path = document_path()
    if path is None:
        pytest.skip(
            f"Firecracker's API document shared/firecracker/{DOCUMENT_NAME} is not beside this checkout "
            "(or set BROWSERVM_FIRECRACKER_API_DOC): the contract tests validate against it"
        )
    return path


@pytest.fixture(scope="session")
def contract(api_document: Path) -> Contract:
    return Contract(api_document)


@dataclass
class Standin:
    """The stand-in installed as a ``firecracker`` executable, and the log of what it was asked."""

    binary: Path
    log: Path

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def assert_all_valid(self) -> list[dict[str, Any]]:
        """Every request the driver sent matched the document, and so did every answer."""
        requests = self.requests()
        assert requests, "the stand-in was asked nothing"
        invalid = [r for r in requests if r["operation"] is None or r["errors"]]
        assert invalid == [], f"requests that do not match Firecracker's API document: {invalid}"
        bad_answers = [r for r in requests if r["response_errors"]]
        assert bad_answers == [], f"the stand-in answered outside the document: {bad_answers}"
        return requests

    def operations(self) -> list[str]:
        return [r["operation"] for r in self.requests()]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must fit in 108 bytes: a short directory under /tmp."""
    path = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def standin(api_document: Path, short_dir: Path) -> Standin:
    directory = short_dir / "bin"
    directory.mkdir()
    binary = directory / "firecracker"
    log = short_dir / "standin.jsonl"
    # The driver starts firecracker with a bare environment: what the stand-in needs is written in here.
    binary.write_text(
        "#!/bin/sh\n"
        f"export FC_STANDIN_LOG='{log}'\n"
        f"export BROWSERVM_FIRECRACKER_API_DOC='{api_document}'\n"
        f"exec '{sys.executable}' '{STANDIN}' \"$@\"\n"
    )
    binary.chmod(0o755)
    return Standin(binary, log)


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed")
    name = f"{NETNS_PREFIX}{secrets.token_hex(4)}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot create a network namespace (root needed): {result.stderr.strip()}")
    try:
        # The controller's shape (browservm.sandbox.network): an eth0 at the far end of a veth, which
        # the VM's bridge takes as its uplink. Both ends stay in this namespace.
        subprocess.run(
            ["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink"],
            capture_output=True,
            check=True,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def links_in(netns: str) -> list[str]:
    result = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True, check=True
    )
    return [link["ifname"] for link in json.loads(result.stdout)]


@dataclass
class ImageFiles:
    kernel: Path
    rootfs: Path
    initrd: Path


@pytest.fixture
def image(short_dir: Path) -> ImageFiles:
    """Files where the image builder puts its outputs; the stand-in opens them as Firecracker would."""
    directory = short_dir / "image"
    directory.mkdir()
    files = ImageFiles(directory / "vmlinux", directory / "rootfs.ext4", directory / "initrd.img")
    files.kernel.write_bytes(b"\x7fELF stand-in kernel")
    files.rootfs.write_bytes(b"\0" * 4096)
    files.initrd.write_bytes(b"070701 stand-in initrd")
    return files
