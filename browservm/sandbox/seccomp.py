"""The seccomp filter every guest process runs under (bubblewrap loads it just before the agent starts).

It refuses, with ``EPERM``, the system calls that escapes and kernel exploits are made of and that
nothing a sandbox runs (Xvfb, Chromium without its own sandbox, Node CLIs, a user's shell) needs:
mounting and namespaces, kernel modules and kexec, the kernel keyring, BPF and perf events, io_uring and
userfaultfd (the usual primitives of recent kernel exploits), file handles (``open_by_handle_at`` read
files outside a container), clock and swap changes, reboot. System calls of other ABIs (32-bit x86,
x32) kill the process: they are how filters written for one ABI used to be bypassed.

The list follows Docker's default profile where that refuses a call outright; the filter is compiled by
libseccomp (through ``pyseccomp``), not assembled by hand.
"""

from __future__ import annotations

import errno
import os

import pyseccomp

REFUSED = (
    # filesystems and namespaces: a guest must not change what it sees
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "uselib", "sysfs", "ustat",
    "lookup_dcookie", "iopl", "ioperm", "vhangup", "nfsservctl",
    # exploit surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "add_key", "request_key", "keyctl",
    # host-wide clocks
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)  # fmt: skip


def compile_filter() -> bytes:
    """The BPF program, as bubblewrap's ``--seccomp FD`` reads it."""
    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    # Calls of an architecture the filter was not built for are killed (libseccomp's default for a
    # foreign ABI is the same, said here so that no one relaxes it by accident).
    rules.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for name in REFUSED:
        try:
            rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):
            continue  # a call this kernel's ABI does not have
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb", closefd=True) as out:
            rules.export_bpf(out)
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    return b"".join(chunks)


def filter_fd(program: bytes) -> int:
    """A file descriptor holding ``program`` from its start, for a child to inherit (close it after)."""
    fd = os.memfd_create("browservm-seccomp", 0)
    view = memoryview(program)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
