"""What a process sandbox sees, as one bubblewrap command line.

The root is the guest image's tree (``browservm image build``, docs/image.md), read-only: the guest sees
the image's Debian, Python, Chromium and CLIs, and nothing of the host's file system. Writable are only
the sandbox's own home (``/home/user``) and run directory (``/run/browservm``), and a size-limited
private ``/tmp``, ``/var/tmp`` and ``/dev/shm``. Its ``/etc/hostname``, ``hosts`` and ``resolv.conf``
are its own.

The guest runs as an unprivileged host user of its own (a uid no other sandbox has), mapped to uid 1000
(``user``, as the image knows it) inside a user namespace. bubblewrap sets everything up, then drops
every capability and sets ``no_new_privs`` before the agent starts, under the seccomp filter of
:mod:`browservm.sandbox.seccomp`. Further user namespaces are disabled (``--disable-userns``), and the
mounts it was given reach it locked by the kernel (they came from a more privileged mount namespace):
a guest can neither unmount nor remount any of them.
"""

# ruff: noqa: S108 - /tmp, /var/tmp and /dev/shm here are paths inside the sandbox, fresh tmpfs

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GUEST_UID = 1000
GUEST_HOME = Path("/home/user")
GUEST_RUN = Path("/run/browservm")
OWN_ETC = ("hostname", "hosts", "resolv.conf")
"""Files of ``/etc`` each sandbox has of its own (the image's are its defaults)."""


@dataclass(frozen=True, slots=True)
class View:
    """Everything that decides one sandbox's command line."""

    root: Path
    """The image's tree, mounted read-only as ``/``."""
    home: Path
    """The host directory mounted writable at :data:`GUEST_HOME`."""
    run: Path
    """The host directory mounted writable at :data:`GUEST_RUN`."""
    etc: Path
    """A host directory with the sandbox's own :data:`OWN_ETC` files."""
    hostname: str
    seccomp_fd: int
    tmp_mib: int
    extra: Sequence[str] = field(default_factory=tuple)
    """More options for the inner bubblewrap."""


def command(view: View, uid: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` in ``view`` as host user ``uid``; it is started as root.

    Two bubblewraps, because an unprivileged one can only bind what its user may read (the image and the
    sandbox's directories live in the controller's state directory, root's alone): the outer one, as
    root, builds the file system view in a mount namespace of its own and keeps only the capabilities to
    change user; ``setpriv`` becomes the sandbox's user; the inner one, unprivileged, maps that user to
    ``user`` in a new user namespace, unshares the rest (PID, IPC, UTS, cgroup), mounts a ``/proc`` of
    its own and starts ``argv`` with no capabilities, ``no_new_privs`` and the seccomp filter.
    """
    size = str(view.tmp_mib * 1024 * 1024)
    outer = [
        "bwrap",
        "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        "--ro-bind", str(view.root), "/",
        "--dev", "/dev",
        "--bind", "/proc", "/proc",  # replaced by the inner one's own procfs; it writes its uid map here
        "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
        "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
        # X servers refuse to create their socket directory unless they are root: it is made here.
        "--perms", "1777", "--dir", "/tmp/.X11-unix",
        "--perms", "1777", "--size", size, "--tmpfs", "/var/tmp",
        "--tmpfs", "/run",
        "--bind", str(view.home), str(GUEST_HOME),
        "--bind", str(view.run), str(GUEST_RUN),
    ]  # fmt: skip
    for name in OWN_ETC:
        outer += ["--ro-bind", str(view.etc / name), f"/etc/{name}"]
    user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    inner = [
        "bwrap",
        "--unshare-user", "--uid", str(GUEST_UID), "--gid", str(GUEST_UID),
        "--disable-userns",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", view.hostname,
        "--new-session",
        "--dev-bind", "/", "/",  # the outer view's mounts, each with its own flags (only /dev has devices)
        "--proc", "/proc",
        "--chdir", str(GUEST_HOME),
        "--seccomp", str(view.seccomp_fd),
        *view.extra,
    ]  # fmt: skip
    return [*outer, "--", *user, "--", *inner, "--", *argv]


def probe_command(uid: int) -> list[str]:
    """The smallest command of :func:`command`'s shape: it succeeds where sandboxes can be built."""
    return [
        "bwrap", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        "--ro-bind", "/", "/", "--dev", "/dev", "--bind", "/proc", "/proc",
        "--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--", "bwrap", "--unshare-user", "--disable-userns", "--unshare-pid", "--dev-bind", "/", "/",
        "--proc", "/proc", "--", "true",
    ]  # fmt: skip


def etc_files(hostname: str, dns: Sequence[str] = ()) -> dict[str, str]:
    """The sandbox's own name and DNS servers."""
    resolvers = "".join(f"nameserver {server}\n" for server in dns) or "# no DNS for this sandbox\n"
    return {
        "resolv.conf": resolvers,
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    }
