"""Image trees on disk: run a command with a tree as its root, compose layers, measure, remove.

Build steps that need the image's own programs (its python3 for pip, its Node.js for npm) run under
bubblewrap with the tree read-only as ``/`` and only the layer being built bound writable, so a step can
never change a cached layer below it. Layers are merged into an image's tree by hard links: a composed
tree costs no space beyond its directories, and the result must be treated as read-only (the process
backend binds it read-only; VMs get it as a read-only ext4).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from browservm.logs import file_tail
from browservm.sandbox.image.errors import ImageBuildError

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
"""The host's TLS roots, lent to download steps only: a TLS-inspecting proxy the host trusts must be
trusted by pip and npm too. It is never copied into the image."""

STEP_TMP = "/tmp"  # noqa: S108 - a step's own private tmpfs, never the host's /tmp
"""Where a step's borrowed files (pip's wheel, caches, the host's TLS roots) are bound inside the tree."""


@dataclass(frozen=True, slots=True)
class Bind:
    source: Path
    target: str
    writable: bool = False


def run_logged(step: str, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> None:
    """Run ``argv`` with its output appended to ``log``; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        try:
            result = subprocess.run(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ImageBuildError(step, f"{argv[0]} is not installed ({exc.strerror})") from None
    if result.returncode != 0:
        raise ImageBuildError(
            step,
            f"{Path(argv[0]).name} exited with status {result.returncode} (full log: {log})",
            file_tail(log, 4000, missing=""),
        )


def in_tree_argv(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[Bind] = (),
    env: Mapping[str, str] | None = None,
    network: bool = False,
    uid: int | None = None,
    cwd: str = "/",
) -> list[str]:
    """The bubblewrap command line that runs ``argv`` with ``root`` as ``/`` (read-only)."""
    command = ["bwrap", "--ro-bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", STEP_TMP]
    for bind in binds:
        command += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.target]
    if network:
        # Name resolution as the host does it; the tree's own resolv.conf is the guest's.
        command += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
        command += ["--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    else:
        command += ["--unshare-all"]
    if uid is not None:
        command += ["--unshare-user", "--uid", str(uid), "--gid", str(uid)]
    command += ["--die-with-parent", "--new-session", "--chdir", cwd, "--clearenv"]
    for name, value in {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": STEP_TMP,
        "LANG": "C.UTF-8",
        **(env or {}),
    }.items():
        command += ["--setenv", name, value]
    return [*command, "--", *argv]


def download_binds_and_env() -> tuple[list[Bind], dict[str, str]]:
    """What a step that downloads (pip, npm) needs from the host: its TLS roots, under /tmp."""
    if not HOST_CA_BUNDLE.is_file():
        return [], {}
    target = f"{STEP_TMP}/host-ca-certificates.crt"
    return [Bind(HOST_CA_BUNDLE, target)], {
        "PIP_CERT": target,
        "SSL_CERT_FILE": target,
        "NODE_EXTRA_CA_CERTS": target,
    }


def compose(layers: Sequence[Path], target: Path) -> None:
    """Merge the layers, in order, into a new tree at ``target`` by hard links (``cp -al``)."""
    target.mkdir(parents=True)
    for layer in layers:
        result = subprocess.run(
            ["cp", "-a", "--link", f"{layer}/.", f"{target}/"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ImageBuildError("tree", f"cannot link {layer} into {target}", result.stderr)


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path``, each inode counted once (hard-linked layers are not double counted)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _dirs, names in os.walk(path):
        for name in [".", *names]:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def count_inodes(path: Path) -> int:
    return sum(1 + len(names) for _directory, _dirs, names in os.walk(path))


def remove(path: Path) -> None:
    """Remove a tree that may hold read-only files; never crosses into another file system."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    result = subprocess.run(
        ["rm", "-rf", "--one-file-system", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 and path.exists():
        # A mount left under it (a build killed inside mmdebstrap): say so rather than guess.
        raise ImageBuildError("cleanup", f"cannot remove {path}", result.stderr)


def which(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise ImageBuildError(
            "check", f"{program} is not installed on this host (scripts/setup.sh installs it)"
        )
    return found
