"""Reaching into a sandbox's network namespace from a test, the way an operator would with nsenter.

A sandbox's loopback is its own: a test that watches the sandbox's Chromium through its DevTools port
(``BROWSERVM_DEVTOOLS_DEBUG_PORT``) must connect from inside the sandbox's network namespace. A socket
belongs to the namespace its thread was in when it was made, so :func:`in_netns` runs the work on a
thread of its own that has entered the namespace (``setns``) and is never reused.

Tests that build namespaces of their own take them from :func:`new_namespace` (loopback only) and
:func:`viewer_internet` (a viewer's "internet" joined by a veth to a host's public address); both kill
whatever runs inside and remove the namespace on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from browservm.sandbox import scope_of

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
PUBLIC_IP, VIEWER_IP = "198.18.0.1", "198.18.0.2"
"""The host's "public" address and the viewer's, from the benchmarking range (RFC 2544), never routed."""
_libc = ctypes.CDLL(None, use_errno=True)


def sandbox_netns(state_dir: Path, sandbox_id: str) -> str:
    """The name of a sandbox's network namespace (the controller's naming, see sandbox/network.py)."""
    return f"bvm-{scope_of(state_dir)}-{sandbox_id}"


def netns_of_dir(sandbox_dir: Path) -> str:
    """The same, from the sandbox's directory (``state_dir/sandboxes/<id>``) or a path inside it."""
    parts = sandbox_dir.resolve().parts
    index = parts.index("sandboxes")
    return sandbox_netns(Path(*parts[:index]), parts[index + 1])


def _enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {netns}: {os.strerror(error)}")
    finally:
        os.close(fd)


async def in_netns(netns: str, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()`` inside ``netns``, on a fresh thread with an event loop of its own."""

    def run() -> T:
        _enter(netns)
        return asyncio.run(work())  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{netns}") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, run)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=10, check=False
    )
    return [int(pid) for pid in result.stdout.split()]


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process in the namespace (sandboxes start their own sessions), then delete it."""
    deadline = time.monotonic() + 10
    while (pids := namespace_pids(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    ip("netns", "del", namespace)


@contextlib.contextmanager
def new_namespace(prefix: str) -> Iterator[str]:
    """A fresh network namespace ``<prefix>-<random>`` with its loopback up; removed on the way out."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        kill_namespace(name)


@contextlib.contextmanager
def viewer_internet(prefix: str, host: str | None = None) -> Iterator[str]:
    """A namespace standing for the viewer's internet: :data:`VIEWER_IP`, routed to :data:`PUBLIC_IP`.

    :data:`PUBLIC_IP` is put on the host end of a veth, in ``host`` (a namespace name) or, without one,
    in the caller's own namespace; the link goes with the viewer's namespace.
    """
    here = ["-n", host] if host else []
    host_end = f"pub{secrets.token_hex(3)}"
    with new_namespace(prefix) as viewer:
        ip(*here, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", viewer)
        ip(*here, "address", "add", f"{PUBLIC_IP}/24", "dev", host_end)
        ip(*here, "link", "set", host_end, "up")
        ip("-n", viewer, "address", "add", f"{VIEWER_IP}/24", "dev", "eth0")
        ip("-n", viewer, "link", "set", "eth0", "up")
        ip("-n", viewer, "route", "add", "default", "via", PUBLIC_IP)
        yield viewer
