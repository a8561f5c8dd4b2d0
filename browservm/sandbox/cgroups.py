"""A cgroup per sandbox: its memory, task and CPU limits, and the one reliable list of its processes.

A sandbox's processes are found by their cgroup, not by walking a process tree: a service that left its
agent's tree, or an agent whose bubblewrap monitor was killed, is still in the cgroup, so
:meth:`SandboxCgroup.kill` ends every one of them and :meth:`SandboxCgroup.pids` says whether anything
of the sandbox still runs (pid reuse cannot fool it).

Both layouts are handled:

* **cgroup v2** (the unified hierarchy, systemd hosts): ``<base>/<id>`` with ``memory.max``,
  ``memory.swap.max``, ``pids.max``, ``cpu.max``; ``cgroup.kill`` ends the whole group at once. ``<base>``
  is ``browservm-<scope>`` beside the controller's own cgroup. Under systemd the unit delegates its cgroup
  (``Delegate=yes``) and the controller moves itself into a leaf, as the "no internal processes" rule asks.
* **cgroup v1** (hybrid hosts, such as the machines this project is developed on): one directory per
  controller hierarchy (``memory``, ``pids``, ``cpu``), each ``<hierarchy>/browservm-<scope>/<id>``.

A process is placed in its cgroup before it runs the sandbox (:meth:`SandboxCgroup.enter_argv` wraps the
command in a shell that moves itself, then ``exec``s), so nothing it forks can escape the limits. Where
no writable hierarchy exists (an unprivileged controller, a container without delegation),
:meth:`Cgroups.detect` returns ``None``: sandboxes run without limits and ``/readyz`` says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ROOT = Path("/sys/fs/cgroup")
KILL_WAIT_S = 5.0
V1_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(Exception):
    """A cgroup could not be created or limited; the message names the file."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_mib: int
    """Memory and swap together (tmpfs pages the sandbox writes count too)."""
    tasks: int
    """Processes and threads: a fork bomb stops here."""
    cpus: float
    """CPU time as a number of cores (1.5: one and a half cores' worth per period)."""


_CPU_PERIOD_US = 100_000


class SandboxCgroup:
    """The cgroup (one directory per hierarchy on v1) of one sandbox."""

    def __init__(self, sandbox_id: str, directories: list[Path], *, unified: bool) -> None:
        self.sandbox_id = sandbox_id
        self.directories = directories
        self.unified = unified

    def enter_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this cgroup from its first instruction on."""
        procs = [str(directory / "cgroup.procs") for directory in self.directories]
        script = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "browservm-cgroup", *procs, "--", *argv]

    def pids(self) -> set[int]:
        """Every process (thread group) in the cgroup now."""
        found: set[int] = set()
        for directory in self.directories:
            try:
                found |= {int(line) for line in (directory / "cgroup.procs").read_text().split()}
            except FileNotFoundError:
                pass
            except OSError as exc:
                # A cgroup removed between the open and the read answers ENODEV: it is gone, empty.
                if exc.errno != errno.ENODEV:
                    raise
        return found

    def exists(self) -> bool:
        return any(directory.is_dir() for directory in self.directories)

    def kill(self, timeout_s: float = KILL_WAIT_S) -> set[int]:
        """SIGKILL everything in the cgroup, until it is empty or ``timeout_s`` passes; the survivors."""
        if self.unified:
            with contextlib.suppress(FileNotFoundError, OSError):
                (self.directories[0] / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout_s
        while pids := self.pids():
            # v1 has no cgroup.kill: kill what is listed until nothing is; the task limit bounds a fork
            # loop racing us, and a killed process cannot fork any more.
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return pids
            time.sleep(0.02)
        return set()

    def remove(self) -> None:
        """Remove the (empty) cgroup directories; a cgroup that still has processes stays."""
        for directory in self.directories:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                log.warning("cgroup.busy", sandbox_id=self.sandbox_id, path=str(directory))

    def memory_events(self) -> str:
        """What the kernel says about memory pressure (OOM kills), for a failure's detail."""
        directory = self.directories[0]
        for name in ("memory.events", "memory.oom_control"):
            with contextlib.suppress(OSError):
                return (directory / name).read_text().strip().replace("\n", ", ")
        return ""


class Cgroups:
    """This host's cgroup layout and where browservm keeps its sandboxes' cgroups."""

    def __init__(self, bases: list[Path], *, unified: bool) -> None:
        self.bases = bases
        """``browservm-<scope>`` in each hierarchy used (one on v2)."""
        self.unified = unified

    @classmethod
    def detect(cls, scope: str, root: Path = ROOT) -> Cgroups | None:
        """The cgroups this process can create sandbox groups in, or ``None`` when it cannot."""
        name = f"browservm-{scope}"
        try:
            if (root / "cgroup.controllers").exists():
                return cls._detect_unified(root, name)
            bases = [root / controller / name for controller in V1_CONTROLLERS]
            if not all((root / controller).is_dir() for controller in V1_CONTROLLERS):
                return None
            for base in bases:
                base.mkdir(exist_ok=True)
            return cls(bases, unified=False)
        except OSError as exc:
            log.warning("cgroup.unavailable", error=str(exc))
            return None

    @classmethod
    def _detect_unified(cls, root: Path, name: str) -> Cgroups | None:
        own = _own_unified_cgroup(root)
        wanted = {"memory", "pids", "cpu"}
        if not wanted <= set((own / "cgroup.controllers").read_text().split()):
            return None
        enabled = set((own / "cgroup.subtree_control").read_text().split())
        if not wanted <= enabled:
            if (own / "cgroup.procs").read_text().split():
                # Controllers can be enabled for children only in a cgroup with no processes of its own.
                leaf = own / "controller"
                leaf.mkdir(exist_ok=True)
                for pid in (own / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (leaf / "cgroup.procs").write_text(pid)
            (own / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        base = own / name
        base.mkdir(exist_ok=True)
        (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
        return cls([base], unified=True)

    def of(self, sandbox_id: str) -> SandboxCgroup:
        return SandboxCgroup(sandbox_id, [base / sandbox_id for base in self.bases], unified=self.unified)

    def create(self, sandbox_id: str, limits: Limits) -> SandboxCgroup:
        cgroup = self.of(sandbox_id)
        memory = limits.memory_mib * 1024 * 1024
        quota = max(1000, int(limits.cpus * _CPU_PERIOD_US))
        if self.unified:
            files = {
                "memory.max": str(memory),
                "memory.swap.max": "0",
                "pids.max": str(limits.tasks),
                "cpu.max": f"{quota} {_CPU_PERIOD_US}",
            }
        else:
            files = {
                "memory/memory.limit_in_bytes": str(memory),
                "pids/pids.max": str(limits.tasks),
                "cpu/cpu.cfs_period_us": str(_CPU_PERIOD_US),
                "cpu/cpu.cfs_quota_us": str(quota),
            }
        for directory in cgroup.directories:
            directory.mkdir(exist_ok=True)
        for relative, value in files.items():
            target = self._file(cgroup, relative)
            try:
                target.write_text(value)
            except OSError as exc:
                cgroup.remove()
                raise CgroupError(f"cannot set {target} to {value}: {exc.strerror}") from exc
        if not self.unified:
            # memsw counts swap too, where the kernel accounts it; without it the limit is memory only.
            with contextlib.suppress(OSError):
                self._file(cgroup, "memory/memory.memsw.limit_in_bytes").write_text(str(memory))
        return cgroup

    def _file(self, cgroup: SandboxCgroup, relative: str) -> Path:
        if self.unified:
            return cgroup.directories[0] / relative
        hierarchy, _, name = relative.partition("/")
        return cgroup.directories[V1_CONTROLLERS.index(hierarchy)] / name

    def sandbox_ids(self) -> set[str]:
        """Sandboxes with a cgroup here (a crashed controller's leftovers among them)."""
        found: set[str] = set()
        for base in self.bases:
            with contextlib.suppress(FileNotFoundError):
                found |= {
                    entry.name for entry in base.iterdir() if entry.is_dir() and entry.name != "controller"
                }
        return found

    def describe(self) -> str:
        kind = "v2" if self.unified else "v1"
        return f"cgroup {kind} at {', '.join(str(b) for b in self.bases)}"


def _own_unified_cgroup(root: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy == "0":
            return root / path.lstrip("/")
    return root
