"""The ``process`` backend: a sandbox is a guest agent process tree on this host, confined.

Each sandbox owns ``state_dir/sandboxes/<id>/`` (root's): ``home/`` (the user's home, ``/home/user``
inside) and ``run/`` (``/run/browservm`` inside: the channel socket ``agent.sock``, ``agent.log``,
service logs, the browser profile), both owned by the sandbox's own host user, and ``etc/`` (its
``passwd``, ``hostname``...). The agent starts in a session of its own, so it outlives a controller
crash; a restarted controller rebuilds the handle from its record (:class:`ProcessRuntime`: the
directory, the top process's pid and start time, the uid, the limits, whether it has a cgroup, its
network namespace and image) and adopts it (:meth:`probe`, :meth:`connect`).

Confinement (what a guest gets, measured by ``tests/sandbox/test_isolation.py`` from inside):

* **No privilege.** The agent and everything it starts run as an unprivileged host user of their own (a
  uid no other sandbox has), ``user`` (1000) inside a user namespace, with no capabilities,
  ``no_new_privs``, further user namespaces disabled and a seccomp filter
  (:mod:`browservm.sandbox.seccomp`). Its view of the file system is :mod:`browservm.sandbox.bubblewrap`'s:
  the host's ``/`` read-only with the controller's state, secrets and every home hidden, mounts it cannot
  undo.
* **Bounded.** A cgroup per sandbox (:mod:`browservm.sandbox.cgroups`) limits its memory (tmpfs
  included), tasks and CPU, from the spec's :class:`~browservm.sandbox.base.Resources`; its ``/tmp`` and
  ``/dev/shm`` are size-limited tmpfs.
* **Found by its cgroup.** Every process of the sandbox is in its cgroup, so :meth:`destroy` ends all of
  them (also a service that left its agent's tree, or an agent whose bubblewrap monitor was killed), and
  :meth:`probe` is not fooled by pid reuse. Every process also carries ``BROWSERVM_SANDBOX_DIR`` in its
  environment: on a host without writable cgroups that is how stragglers and orphans are found.

* **Networked apart.** The agent starts inside the network namespace the controller made for the
  sandbox (``spec.network.netns``, :mod:`browservm.sandbox.network`); without one it gets a namespace
  with only its own loopback. Either way it shares nothing with the host's or another sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil
import structlog

from browservm import protocol
from browservm.logs import file_tail
from browservm.sandbox import bubblewrap, scope_of, seccomp
from browservm.sandbox.base import (
    BackendReadiness,
    GuestImage,
    Liveness,
    NetworkSpec,
    Resources,
    Role,
    RuntimeRecord,
    SandboxBackend,
    SandboxBootTimeout,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
    SandboxUnsupported,
)
from browservm.sandbox.cgroups import CgroupError, Cgroups, Limits, SandboxCgroup
from browservm.sandbox.channel import Channel

log = structlog.get_logger(__name__)

SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MARKER_ENV = "BROWSERVM_SANDBOX_DIR"
HIBERNATED_MARKER = "hibernated"
STOP_GRACE_S = 5.0
CONNECT_POLL_S = 0.02
UNIX_PATH_MAX = 107
"""Longest unix socket path the kernel takes (108 bytes with the NUL)."""
UID_BASE = 2_000_000_000
UID_COUNT = 100_000_000
"""Host uids for sandboxes: far above any user's, /etc/subuid ranges and container remaps."""


class ProcessRuntime(RuntimeRecord):
    """What the process backend records of a sandbox (its ``handle.runtime``)."""

    dir: Path
    socket: Path
    """The agent's channel socket."""
    pid: int | None = None
    """The process the backend started (bubblewrap's monitor); ``None`` while hibernated."""
    start_time: float | None = None
    """``pid``'s start time, so a reused pid is never taken for it."""
    uid: int | None = None
    """The sandbox's host user (records from before sandboxes had one of their own have none)."""
    resources: Resources = Resources()
    cgroup: bool = False
    """Whether its processes are in a cgroup of their own (found there, not by pid)."""
    netns: str | None = None
    image: Path | None = None
    """The image tree it runs."""


class ProcessBackend(SandboxBackend):
    name = "process"

    def __init__(
        self,
        state_dir: Path,
        image: Path | Callable[[], Path] | None = None,
        *,
        python: str = "python3",
        idle_timeout_s: float = 120.0,
        uid_base: int = UID_BASE,
        uid_count: int = UID_COUNT,
        cgroups: Cgroups | bool | None = True,
    ) -> None:
        self.state_dir = state_dir
        self._image = image
        """The guest image's tree every sandbox runs as its ``/`` (or what finds the current one); without
        one the backend can still probe, adopt and destroy sandboxes, not create them."""
        self.python = python
        """The agent's interpreter inside the image."""
        self.idle_timeout_s = idle_timeout_s
        """The guest ends itself when no controller spoke to it for this long (0: never)."""
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.scope = scope_of(state_dir)
        """Names this controller's host-wide resources (cgroups), so controllers never touch each other's."""
        if cgroups is True:
            self.cgroups = Cgroups.detect(self.scope)
        else:
            self.cgroups = cgroups or None
        self._seccomp = seccomp.compile_filter()
        self._bwrap_ok: bool | None = None
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        """Agents started by this backend instance, so their exit is noticed and reaped at once."""

    def image_root(self, image: GuestImage | None = None) -> Path:
        """The tree a sandbox starts from: ``image``'s (a spec's), else the backend's own now;
        :class:`SandboxError` with the fix when there is none."""
        if image is not None and image.tree is not None:
            root = image.tree
        elif self._image is None:
            raise SandboxError("-", "this process backend was given no guest image to run sandboxes from")
        else:
            try:
                root = self._image if isinstance(self._image, Path) else self._image()
            except LookupError as exc:
                raise SandboxError("-", str(exc)) from None
        if not (root / "usr" / "bin" / "python3").exists():
            raise SandboxError(
                "-",
                f"{root} is not a guest image tree (no usr/bin/python3): rebuild it with browservm image build",
            )
        return root

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    # ------------------------------------------------------------------ the sandbox's command

    def _agent_argv(self, sandbox_id: str, role: Role) -> list[str]:
        return [
            self.python,
            "-m",
            "browservm.guest.agent",
            "--sandbox-id",
            sandbox_id,
            "--role",
            role,
            "--listen",
            f"unix:{bubblewrap.GUEST_RUN / 'agent.sock'}",
            "--home",
            str(bubblewrap.GUEST_HOME),
            "--run-dir",
            str(bubblewrap.GUEST_RUN),
            "--idle-timeout-s",
            f"{self.idle_timeout_s:g}",
        ]

    def _env(self, sandbox_dir: Path, sandbox_id: str, extra_env: Mapping[str, str] | None) -> dict[str, str]:
        # Not the controller's environment: it holds secrets (vault keys, database URL) a guest must not see.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(bubblewrap.GUEST_HOME),
            "USER": "user",
            "LOGNAME": "user",
            "SHELL": "/bin/bash",
            "PYTHONUNBUFFERED": "1",
            MARKER_ENV: str(sandbox_dir),
            "BROWSERVM_SANDBOX_ID": sandbox_id,
        }
        env.update(extra_env or {})
        return env

    # ------------------------------------------------------------------ lifecycle

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        if spec.network.egress_allow:
            raise SandboxUnsupported(
                spec.sandbox_id,
                "per-sandbox egress lists are not built yet (the sandbox network's policy applies to all)",
            )
        if not SANDBOX_ID.fullmatch(spec.sandbox_id):
            raise SandboxError(
                spec.sandbox_id,
                "a sandbox id must be 1-64 letters, digits, '_' or '-' (it names a directory)",
            )
        sandbox_dir = self.sandboxes_dir / spec.sandbox_id
        socket = sandbox_dir / "run" / "agent.sock"
        if len(str(socket)) > UNIX_PATH_MAX:
            raise SandboxError(
                spec.sandbox_id,
                f"channel socket path {socket} is longer than {UNIX_PATH_MAX} bytes; "
                "use a shorter BROWSERVM_STATE_DIR",
            )
        if sandbox_dir.exists():
            raise SandboxError(spec.sandbox_id, f"{sandbox_dir} already exists: destroy that sandbox first")
        if not await asyncio.to_thread(self.bwrap_usable):
            raise SandboxError(spec.sandbox_id, self._bwrap_problem())
        try:
            uid = self._prepare_dir(spec.sandbox_id, sandbox_dir, spec.network)
            return await asyncio.to_thread(
                self._start,
                spec.sandbox_id,
                spec.role,
                sandbox_dir,
                uid,
                spec.resources,
                spec.network.netns,
                spec.env,
                spec.image,
            )
        except BaseException:
            await self.destroy_orphan(spec.sandbox_id)
            raise

    def _prepare_dir(self, sandbox_id: str, sandbox_dir: Path, network: NetworkSpec) -> int:
        """The sandbox's directories, owned by a host uid of its own (returned). No awaits in here: two
        creates on this loop cannot pick the same uid."""
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        # Traversable to reach one's own directory (the agent's socket), not listable.
        os.chmod(self.sandboxes_dir, 0o711)  # noqa: S103
        taken = self._uids_in_use()
        while (uid := self.uid_base + secrets.randbelow(self.uid_count)) in taken:
            pass
        sandbox_dir.mkdir(mode=0o711)
        for name in ("home", "run"):
            (sandbox_dir / name).mkdir(mode=0o700)
            os.chown(sandbox_dir / name, uid, uid)
        etc = sandbox_dir / "etc"
        etc.mkdir(mode=0o755)
        for name, content in bubblewrap.etc_files(_hostname(sandbox_id), network.dns).items():
            (etc / name).write_text(content)
            os.chmod(etc / name, 0o644)
        return uid

    def _uids_in_use(self) -> set[int]:
        taken = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.sandboxes_dir.iterdir():
                with contextlib.suppress(OSError):
                    taken.add((entry / "home").stat().st_uid)
        return taken

    def _start(
        self,
        sandbox_id: str,
        role: Role,
        sandbox_dir: Path,
        uid: int,
        resources: Resources,
        netns: str | None,
        extra_env: Mapping[str, str] | None = None,
        image: GuestImage | None = None,
    ) -> SandboxHandle:
        root = self.image_root(image)
        cgroup = self._cgroup(sandbox_id, resources)
        fd = seccomp.filter_fd(self._seccomp)
        try:
            view = bubblewrap.View(
                root=root,
                home=sandbox_dir / "home",
                run=sandbox_dir / "run",
                etc=sandbox_dir / "etc",
                hostname=_hostname(sandbox_id),
                seccomp_fd=fd,
                tmp_mib=resources.tmp_mib,
                extra=("--unshare-net",) if netns is None else (),
            )
            argv = bubblewrap.command(view, uid, self._agent_argv(sandbox_id, role))
            if netns is not None:
                # Its own network namespace, made by the controller (root's: the guest can change nothing
                # of it); without one, bubblewrap gives it a namespace with only a loopback.
                argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
            if cgroup is not None:
                argv = cgroup.enter_argv(argv)
            with contextlib.suppress(FileNotFoundError):
                (sandbox_dir / "run" / "agent.sock").unlink()
            with (sandbox_dir / "run" / "agent.log").open("ab") as agent_log:
                try:
                    process = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=agent_log,
                        stderr=subprocess.STDOUT,
                        env=self._env(sandbox_dir, sandbox_id, extra_env),
                        cwd=sandbox_dir,
                        start_new_session=True,
                        pass_fds=(fd,),
                    )
                except OSError as exc:
                    raise SandboxError(sandbox_id, f"cannot start the guest agent: {exc}") from exc
        finally:
            os.close(fd)
        self._children[sandbox_id] = process
        try:
            start_time = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess as exc:
            raise SandboxError(
                sandbox_id,
                "the guest agent exited at once",
                detail=file_tail(sandbox_dir / "run" / "agent.log"),
            ) from exc
        log.info(
            "sandbox.started", sandbox_id=sandbox_id, pid=process.pid, uid=uid, cgroup=cgroup is not None
        )
        runtime = ProcessRuntime(
            pid=process.pid,
            start_time=start_time,
            dir=sandbox_dir,
            socket=sandbox_dir / "run" / "agent.sock",
            uid=uid,
            resources=resources,
            cgroup=cgroup is not None,
            netns=netns,
            image=root,
        )
        return SandboxHandle.of(sandbox_id, self.name, role, runtime)

    def _cgroup(self, sandbox_id: str, resources: Resources) -> SandboxCgroup | None:
        if self.cgroups is None:
            return None
        limits = Limits(memory_mib=resources.memory_mib, tasks=resources.tasks, cpus=float(resources.vcpus))
        try:
            return self.cgroups.create(sandbox_id, limits)
        except CgroupError as exc:
            raise SandboxError(sandbox_id, f"cannot limit the sandbox: {exc}") from exc

    async def connect(self, handle: SandboxHandle, *, timeout_s: float) -> Channel:
        runtime = handle.runtime_as(ProcessRuntime)
        agent_log = runtime.dir / "run" / "agent.log"
        deadline = time.monotonic() + timeout_s
        while True:
            if self._liveness(handle.sandbox_id, runtime) != Liveness.ALIVE:
                raise SandboxError(
                    handle.sandbox_id,
                    "the guest agent is not running",
                    detail=self._failure_detail(handle.sandbox_id, runtime),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxBootTimeout(handle.sandbox_id, timeout_s, file_tail(agent_log))
            try:
                reader, writer = await asyncio.open_unix_connection(str(runtime.socket))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # The agent creates its socket once it listens; the kernel gives no event for a path
                # appearing that works across a bwrap mount namespace, so poll briefly.
                await asyncio.sleep(min(CONNECT_POLL_S, remaining))
        try:
            return await asyncio.wait_for(
                Channel.handshake(handle.sandbox_id, reader, writer), deadline - time.monotonic()
            )
        except TimeoutError as exc:
            writer.close()
            raise SandboxBootTimeout(handle.sandbox_id, timeout_s, file_tail(agent_log)) from exc
        except (protocol.ProtocolError, ConnectionError, Exception) as exc:
            writer.close()
            raise SandboxError(
                handle.sandbox_id, f"the guest agent's handshake failed: {exc}", detail=file_tail(agent_log)
            ) from exc

    def _failure_detail(self, sandbox_id: str, runtime: ProcessRuntime) -> str:
        detail = file_tail(runtime.dir / "run" / "agent.log")
        if self.cgroups is not None and runtime.cgroup:
            events = self.cgroups.of(sandbox_id).memory_events()
            if events:
                detail += f"\n(cgroup memory: {events})"
        return detail

    async def destroy(self, handle: SandboxHandle) -> None:
        if not handle.recorded:
            await self.destroy_orphan(handle.sandbox_id)
            return
        runtime = handle.runtime_as(ProcessRuntime)
        await self._remove(handle.sandbox_id, runtime.dir, runtime)

    async def destroy_orphan(self, sandbox_id: str) -> None:
        """Its directory is found from its id, its processes in its cgroup and by their marker."""
        await self._remove(sandbox_id, self._dir_of(sandbox_id), None)

    async def _remove(self, sandbox_id: str, sandbox_dir: Path, runtime: ProcessRuntime | None) -> None:
        await asyncio.to_thread(self._stop_processes, sandbox_id, runtime, sandbox_dir)
        await asyncio.to_thread(shutil.rmtree, sandbox_dir, ignore_errors=True)
        log.info("sandbox.destroyed", sandbox_id=sandbox_id)

    def _dir_of(self, sandbox_id: str) -> Path:
        if not SANDBOX_ID.fullmatch(sandbox_id):
            raise SandboxError(sandbox_id, "not a sandbox id this backend creates")
        return self.sandboxes_dir / sandbox_id

    async def probe(self, handle: SandboxHandle) -> Liveness:
        if not handle.recorded:
            return Liveness.GONE  # nothing it started was recorded: nothing of it is adopted
        return self._liveness(handle.sandbox_id, handle.runtime_as(ProcessRuntime))

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        if handle.role != "cli":
            raise SandboxUnsupported(
                handle.sandbox_id, "only CLI sandboxes hibernate; a browser sandbox is destroyed instead"
            )
        runtime = handle.runtime_as(ProcessRuntime)
        await asyncio.to_thread(self._stop_processes, handle.sandbox_id, runtime, runtime.dir)
        (runtime.dir / HIBERNATED_MARKER).write_text(f"{time.time()}\n")
        asleep = runtime.model_copy(update={"pid": None, "start_time": None})
        return SandboxHandle.of(handle.sandbox_id, self.name, handle.role, asleep)

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        runtime = handle.runtime_as(ProcessRuntime)
        sandbox_dir = runtime.dir
        if self._liveness(handle.sandbox_id, runtime) == Liveness.ALIVE:
            return handle
        if not (sandbox_dir / HIBERNATED_MARKER).exists():
            raise SandboxError(handle.sandbox_id, f"{sandbox_dir} holds no hibernated sandbox to resume")
        uid = (sandbox_dir / "home").stat().st_uid
        resumed = await asyncio.to_thread(
            self._start, handle.sandbox_id, handle.role, sandbox_dir, uid, runtime.resources, runtime.netns
        )
        (sandbox_dir / HIBERNATED_MARKER).unlink()
        return resumed

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        known_ids = set(known)
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found |= {entry.name for entry in self.sandboxes_dir.iterdir() if entry.is_dir()}
        if self.cgroups is not None:
            found |= self.cgroups.sandbox_ids()
        prefix = str(self.sandboxes_dir) + os.sep
        for process in await asyncio.to_thread(_marked_processes, None):
            marker = _environ(process).get(MARKER_ENV, "")
            if marker.startswith(prefix):
                found.add(marker[len(prefix) :])
        return sorted(found - known_ids)

    async def readiness(self) -> BackendReadiness:
        problems: list[str] = []
        try:
            root = self.image_root()
        except SandboxError as exc:
            problems.append(str(exc).removeprefix("sandbox -: "))
            root = None
        if not await asyncio.to_thread(self.bwrap_usable):
            problems.append(self._bwrap_problem())
        if problems:
            return BackendReadiness(False, "; ".join(problems))
        limits = self.cgroups.describe() if self.cgroups else "no writable cgroups: sandboxes run unlimited"
        return BackendReadiness(
            True,
            f"ok: image {root}; bubblewrap, unprivileged user namespaces, seccomp; {limits}; "
            "a network namespace per sandbox",
        )

    # ------------------------------------------------------------------ bubblewrap

    def bwrap_usable(self) -> bool:
        """Whether bubblewrap can build a sandbox here as an unprivileged user (checked once)."""
        if self._bwrap_ok is None:
            probe = bubblewrap.probe_command(self.uid_base)
            self._bwrap_ok = (
                shutil.which("bwrap") is not None
                and shutil.which("setpriv") is not None
                and subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
            )
        return self._bwrap_ok

    def _bwrap_problem(self) -> str:
        return (
            "bubblewrap cannot create a sandbox as an unprivileged user here: install bubblewrap and "
            "util-linux (apt-get install bubblewrap util-linux), run the controller as root, and allow "
            "unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on Ubuntu also "
            "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap)"
        )

    # ------------------------------------------------------------------ processes

    def _agent_process(
        self, sandbox_id: str, runtime: ProcessRuntime | None, *, in_cgroup: bool
    ) -> psutil.Process | None:
        """The sandbox's agent if it runs now: found in its cgroup when it has one (so never a stranger
        that reused a pid), else by the recorded pid."""
        if self.cgroups is None or not in_cgroup:
            return self._top_process(sandbox_id, runtime)
        for pid in self.cgroups.of(sandbox_id).pids():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if _is_agent(process) and process.status() != psutil.STATUS_ZOMBIE:
                    return process
        return None

    def _top_process(self, sandbox_id: str, runtime: ProcessRuntime | None) -> psutil.Process | None:
        """The process this backend started (bubblewrap's monitor) if it still runs, by pid and start time."""
        child = self._children.get(sandbox_id)
        if child is not None and child.poll() is not None:
            self._children.pop(sandbox_id, None)
        if runtime is None or runtime.pid is None or runtime.start_time is None:
            return None
        top, start_time = runtime.pid, runtime.start_time
        try:
            process = psutil.Process(top)
            if process.create_time() != start_time or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None

    def _liveness(self, sandbox_id: str, runtime: ProcessRuntime) -> Liveness:
        # Alive while what we started runs (its agent may still be starting), or while its agent does
        # (its bubblewrap monitor may have been killed under it).
        if self._top_process(sandbox_id, runtime) or self._agent_process(
            sandbox_id, runtime, in_cgroup=runtime.cgroup
        ):
            return Liveness.ALIVE
        if (runtime.dir / HIBERNATED_MARKER).exists():
            return Liveness.HIBERNATED
        return Liveness.GONE

    def _stop_processes(self, sandbox_id: str, runtime: ProcessRuntime | None, sandbox_dir: Path) -> None:
        """SIGTERM the agent (it stops its services in order), then SIGKILL whatever is left of the
        sandbox after the grace period: everything in its cgroup, and anything carrying its marker.
        ``runtime`` ``None``: an orphan, whose agent is found in its cgroup only."""
        cgroup = self.cgroups.of(sandbox_id) if self.cgroups is not None else None
        agent = self._agent_process(sandbox_id, runtime, in_cgroup=cgroup is not None)
        if agent is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                agent.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and self._remaining(cgroup, sandbox_dir):
            time.sleep(0.02)
        if cgroup is not None:
            survivors = cgroup.kill()
            if survivors:
                log.error("sandbox.unkillable", sandbox_id=sandbox_id, pids=sorted(survivors))
            cgroup.remove()
        stragglers = _marked_processes(str(sandbox_dir))
        for process in stragglers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        _wait_gone(stragglers, STOP_GRACE_S)
        child = self._children.pop(sandbox_id, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_GRACE_S)

    def _remaining(self, cgroup: SandboxCgroup | None, sandbox_dir: Path) -> bool:
        if cgroup is not None:
            return bool(cgroup.pids())
        return any(_running(p) for p in _marked_processes(str(sandbox_dir)))


def _hostname(sandbox_id: str) -> str:
    return sandbox_id.replace("_", "-")[:63]


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie counts: its work is done); return the survivors.

    Not psutil.wait_procs: it waits for zombies of other parents to be reaped, one process at a time,
    which took seconds here for what was over in one.
    """
    deadline = time.monotonic() + timeout_s
    alive = list(processes)
    while alive:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        environ: dict[str, str] = process.environ()
        return environ
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def _marked_processes(sandbox_dir: str | None) -> list[psutil.Process]:
    """Processes whose environment names ``sandbox_dir`` (any sandbox's when ``None``)."""
    found = []
    for process in psutil.process_iter():
        marker = _environ(process).get(MARKER_ENV)
        if marker is not None and (sandbox_dir is None or marker == sandbox_dir):
            found.append(process)
    return found


def _is_agent(process: psutil.Process) -> bool:
    try:
        return process.cmdline()[1:3] == ["-m", "browservm.guest.agent"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
