"""A stand-in for Firecracker's ``jailer``, doing what docs/jailer.md (v1.16.1) says the jailer does,
as far as a test on this machine can:

- validates its arguments (``--id`` letters, digits and '-', at most 64; ``--exec-file`` an executable
  file; ``--uid``/``--gid`` numbers; ``--chroot-base-dir`` absolute; ``--netns`` an existing path);
- creates ``<chroot_base>/<exec_file_name>/<id>/root``, copies the exec file in, and makes
  ``/dev/net/tun`` and ``/dev/kvm`` there with mknod, failing as the jailer does when they exist;
- gives the chroot to ``uid:gid``, joins the network namespace and execs the copied file with
  ``--id=<id> --start-time-us=… --start-time-cpu-us=…`` and the arguments after ``--``.

It cannot pivot into the chroot and drop to ``uid`` (the stand-in VMM is Python, which lives outside the
chroot and under /root); instead it tells the stand-in VMM its root (``FC_STANDIN_ROOT``) and the jailed
user (``FC_STANDIN_UID``/``GID``), and the stand-in checks every file and the TAP as that user would see
them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
from pathlib import Path


def fail(message: str) -> None:
    sys.exit(f"Jailer error: {message}")


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="jailer")
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-file", required=True)
    parser.add_argument("--uid", required=True)
    parser.add_argument("--gid", required=True)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--netns")
    parser.add_argument("--cgroup-version", default="1")
    parser.add_argument("--daemonize", action="store_true")
    parser.add_argument("--new-pid-ns", action="store_true")
    args = parser.parse_args(argv)

    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        fail(f"Invalid instance ID: {args.id}")
    exec_file = Path(args.exec_file)
    if not exec_file.is_file() or not os.access(exec_file, os.X_OK):
        fail(f"{exec_file} is not an executable file")
    if not (args.uid.isdigit() and args.gid.isdigit()):
        fail("uid and gid must be numbers")
    uid, gid = int(args.uid), int(args.gid)
    base = Path(args.chroot_base_dir)
    if not base.is_absolute():
        fail(f"--chroot-base-dir {base} is not absolute")
    netns = Path(args.netns) if args.netns else None
    if netns is not None and not netns.exists():
        fail(f"Failed to open the netns {netns}")
    if args.daemonize or args.new_pid_ns:
        fail("the stand-in plays neither --daemonize nor --new-pid-ns (the driver uses neither)")

    root = base / exec_file.name / args.id / "root"
    root.mkdir(parents=True, exist_ok=True)
    jailed_exec = root / exec_file.name
    shutil.copy2(exec_file, jailed_exec)
    for device, (major, minor) in {"dev/net/tun": (10, 200), "dev/kvm": (10, 232)}.items():
        path = root / device
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        except FileExistsError:
            fail(f"Failed to create /{device} via mknod inside the jail: File exists (os error 17)")
        os.chown(path, uid, gid)
    os.chown(root, uid, gid)

    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # the jailer clears the environment
        "FC_STANDIN_ROOT": str(root),
        "FC_STANDIN_UID": str(uid),
        "FC_STANDIN_GID": str(gid),
    }
    firecracker = [str(jailed_exec), f"--id={args.id}", "--start-time-us=0", "--start-time-cpu-us=0", *extra]
    if netns is not None:
        # `ip netns exec` joins the namespace and, unlike a bare setns, shows its /sys (the TAP's owner).
        os.execve("/usr/sbin/ip", ["ip", "netns", "exec", netns.name, *firecracker], env)
    os.execve(firecracker[0], firecracker, env)


if __name__ == "__main__":
    main()
