"""What starts a QEMU VM: root's last steps before it becomes the sandbox's own unprivileged user.

Run as ``nsenter --net=/run/netns/<ns> -- python -m browservm.sandbox.qemu.launcher SPEC``, as root, in
the sandbox's network namespace and its directory. It opens, with root's rights, what the unprivileged
QEMU could not open itself: the TAP (``/dev/net/tun`` is root's on hosts without udev rules, and a TAP is
found by name in the opener's namespace) and the image's files (under a home directory a sandbox's user
cannot enter). Each lands on the descriptor number the spec names, and QEMU's arguments refer to it
(``-netdev tap,fd=N``, ``/proc/self/fd/N``). Then it drops to the sandbox's uid and gid (with the groups
given, e.g. ``/dev/kvm``'s), sets ``no_new_privs`` and execs QEMU: the pid the backend started is QEMU's.

Only the standard library: it is the first thing in the sandbox's process and starts in a few tens of
milliseconds.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import struct
import sys
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
PR_SET_NO_NEW_PRIVS = 38


def open_tap(name: str) -> int:
    """A descriptor attached to the existing TAP ``name`` in this network namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


def place(fd: int, number: int) -> None:
    """Put ``fd`` at ``number``, inheritable across exec."""
    if fd != number:
        os.dup2(fd, number, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # with every uid non-zero, the kernel clears all capabilities
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def launch(spec: dict[str, Any]) -> None:
    fds: dict[str, str] = spec.get("files", {})
    # Highest numbers first, so that placing one never closes another still to be placed.
    for number, path in sorted(((int(n), p) for n, p in fds.items()), reverse=True):
        flags = os.O_RDONLY if not path.startswith("rw:") else os.O_RDWR
        place(os.open(path.removeprefix("rw:"), flags), number)
    if spec.get("tap"):
        place(open_tap(spec["tap"]["name"]), int(spec["tap"]["fd"]))
    drop_privileges(int(spec["uid"]), int(spec["gid"]), [int(g) for g in spec.get("groups", [])])
    argv: list[str] = spec["argv"]
    os.execv(argv[0], argv)  # noqa: S606 - QEMU, by its path


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m browservm.sandbox.qemu.launcher SPEC_JSON")
    try:
        launch(json.loads(sys.argv[1]))
    except OSError as exc:
        # Into the VM's log (this process's stderr): the backend puts its tail into the failure reason.
        raise SystemExit(f"browservm qemu launcher: {exc}") from None


if __name__ == "__main__":
    main()
