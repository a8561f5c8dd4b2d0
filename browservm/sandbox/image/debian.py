"""Debian's part of an image: the root tree (mmdebstrap, minbase) and the kernel's packages.

mmdebstrap runs as root in a private mount namespace (``unshare --mount``), so the mounts it makes in the
tree (``/proc``, ``/dev``, the package cache) vanish with it even when a build is killed half-way, and
removing a half-built tree can never reach through a bind mount. Downloaded ``.deb`` files go straight
into a cache outside the tree (bind-mounted at the chroot's ``/var/cache/apt/archives``), so a second build
downloads nothing it already has.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from browservm.sandbox.image import recipe
from browservm.sandbox.image.errors import ImageBuildError
from browservm.sandbox.image.tree import run_logged


@contextmanager
def _cache_lock(deb_cache: Path) -> Iterator[None]:
    """apt refuses to share its archive directory: builds that share the cache take turns."""
    deb_cache.mkdir(parents=True, exist_ok=True)
    with (deb_cache / ".browservm-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _mmdebstrap(
    step: str,
    target: Path,
    *,
    variant: str,
    packages: Sequence[str],
    deb_cache: Path,
    log: Path,
    extra: Sequence[str] = (),
) -> None:
    archives = '"$1"/var/cache/apt/archives'
    # The extract variant runs no customize hooks: the cache is released after extraction instead.
    release_hook = "--extract-hook" if variant == "extract" else "--customize-hook"
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "mmdebstrap",
        f"--variant={variant}",
        f"--include={','.join(packages)}",
        "--dpkgopt=force-unsafe-io",  # no fsync per file: the tree is thrown away if the build fails
        "--skip=essential/unlink",  # keep the downloaded packages: they are the cache
        f"--setup-hook=mkdir -p {archives} && mount --bind {deb_cache} {archives}",
        *extra,
        f"{release_hook}=umount {archives}",
        recipe.SUITE,
        str(target),
        *recipe.MIRRORS,
    ]  # fmt: skip
    with _cache_lock(deb_cache):
        run_logged(step, argv, log)


def build_root(target: Path, packages: Sequence[str], *, deb_cache: Path, log: Path) -> None:
    """Debian bookworm minbase with ``packages`` and the user, in the empty directory ``target``."""
    user = (
        f"useradd --uid {recipe.USER_UID} --user-group --create-home --home-dir {recipe.HOME} "
        f"--shell /bin/bash {recipe.USER_NAME}"
    )
    _mmdebstrap(
        "root",
        target,
        variant="minbase",
        packages=packages,
        deb_cache=deb_cache,
        log=log,
        extra=[
            *[f"--dpkgopt={option}" for option in recipe.DPKG_EXCLUDES],
            f'--customize-hook=chroot "$1" {user}',
        ],
    )
    _customize(target)


def _customize(root: Path) -> None:
    """The files every image has: its name, loopback names, the fixed paths the later stages fill."""
    (root / "etc/hostname").write_text("browservm\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost browservm\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # The host's resolver (copied by mmdebstrap) means nothing in a guest: VMs get theirs from the
    # kernel command line (ip=...:DNS0), the process backend binds one.
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# set at boot (the DNS fields of ip=) or bound by the sandbox backend\n")
    for path in (recipe.PYTHON_DIR, recipe.AGENT_DIR, recipe.NODE_DIR, recipe.CLI_DIR, "/etc/browservm"):
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    pth = root / recipe.PTH_PATH.lstrip("/")
    pth.parent.mkdir(parents=True, exist_ok=True)
    # The agent's code first, then its pinned dependencies: python3 -m browservm.guest.agent from anywhere.
    pth.write_text(f"{recipe.AGENT_DIR}\n{recipe.PYTHON_DIR}\n")


def extract_kernel_packages(target: Path, *, deb_cache: Path, log: Path) -> None:
    """Unpack Debian's kernel and busybox-static (no maintainer scripts) into ``target``."""
    _mmdebstrap(
        "kernel",
        target,
        variant="extract",
        packages=[recipe.KERNEL_PACKAGE, *recipe.INITRAMFS_TOOLS],
        deb_cache=deb_cache,
        log=log,
    )


def installed_packages(root: Path) -> dict[str, str]:
    """Every Debian package in the tree and its version, from the tree's own dpkg database."""
    result = subprocess.run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f", "${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError("root", "cannot list the tree's packages", result.stderr)
    pairs = (line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    return dict(sorted((name, version) for name, version in pairs))
