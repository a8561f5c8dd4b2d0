"""The ``process`` backend: a sandbox is a guest agent process tree on this host.

Each sandbox owns ``state_dir/sandboxes/<id>/`` with ``home/`` (the user's home) and ``run/`` (the
channel socket ``agent.sock``, ``agent.log``, service logs, the browser profile). The agent starts in a
session of its own, so it outlives a controller crash; a restarted controller rebuilds the handle from
``runtime`` and adopts it (:meth:`ProcessBackend.probe`, :meth:`ProcessBackend.connect`).

Where bubblewrap works, the agent runs under ``bwrap``: the whole filesystem read-only except its own
sandbox directory, a private ``/tmp`` (so its X display socket is its alone), and private PID and IPC
namespaces. The controller's state directory is hidden under an empty tmpfs with only the sandbox's own
directory bound back: other sandboxes (their homes, credentials and agent sockets), the database, the
vault keys and the controller's signing key are not there to read. So are the files named in ``hidden``
(the vault key file and the config file when they live elsewhere). Not ``--die-with-parent``: the sandbox
must outlive its controller.

Network: **sandboxes share the host's network namespace for now**; the sandbox network (a namespace per
host with a bridge, an address per sandbox and the nftables egress policy) is a later issue. Its handle
will go into ``runtime["netns"]`` (``None`` today) and the agent command will be wrapped in
``ip netns exec``; nothing else here changes. Until then a spec that asks for an egress policy is
refused rather than run unfiltered.

Every process of a sandbox carries ``BROWSERVM_SANDBOX_DIR`` in its environment. :meth:`destroy` uses it
to find stragglers that left the agent's process tree (a service re-parented after its agent was
killed), and :meth:`list_orphans` to find agents nobody knows about.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import psutil
import structlog

import browservm
from browservm import protocol
from browservm.sandbox.base import (
    BackendReadiness,
    Liveness,
    Role,
    SandboxBackend,
    SandboxBootTimeout,
    SandboxError,
    SandboxHandle,
    SandboxSpec,
    SandboxUnsupported,
)
from browservm.sandbox.channel import Channel

log = structlog.get_logger(__name__)

SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MARKER_ENV = "BROWSERVM_SANDBOX_DIR"
HIBERNATED_MARKER = "hibernated"
STOP_GRACE_S = 5.0
CONNECT_POLL_S = 0.02
LOG_TAIL_BYTES = 4096
UNIX_PATH_MAX = 107
"""Longest unix socket path the kernel takes (108 bytes with the NUL)."""


def _tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - size))
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"


class ProcessBackend(SandboxBackend):
    name = "process"

    def __init__(
        self,
        state_dir: Path,
        python: str = sys.executable,
        use_bwrap: bool | None = None,
        hidden: Sequence[Path] = (),
    ) -> None:
        self.state_dir = state_dir
        self.python = python
        self.hidden = [path.resolve() for path in hidden]
        """Secrets outside the state directory that no sandbox may read."""
        self._use_bwrap = use_bwrap
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        """Agents started by this backend instance, so their exit is noticed and reaped at once."""

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    # ------------------------------------------------------------------ bubblewrap

    def bwrap_usable(self) -> bool:
        """Whether bubblewrap is installed and can create namespaces here (checked once)."""
        if self._use_bwrap is None:
            binary = shutil.which("bwrap")
            self._use_bwrap = binary is not None and (
                subprocess.run(
                    [binary, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-ipc", "true"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                ).returncode
                == 0
            )
        return self._use_bwrap

    def _command(self, sandbox_id: str, role: Role, sandbox_dir: Path, bwrap: bool) -> list[str]:
        agent = [
            self.python,
            "-m",
            "browservm.guest.agent",
            "--sandbox-id",
            sandbox_id,
            "--role",
            role,
            "--listen",
            f"unix:{sandbox_dir / 'run' / 'agent.sock'}",
            "--home",
            str(sandbox_dir / "home"),
            "--run-dir",
            str(sandbox_dir / "run"),
        ]
        if not bwrap:
            return agent
        # The outer bwrap stays as a monitor, the inner one is the new PID namespace's init and the agent
        # its child: a SIGKILL of the init ends every process of the sandbox at once.
        return [
            "bwrap",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",  # noqa: S108 - a fresh private tmpfs, not the host /tmp
            "--tmpfs", str(self.state_dir.resolve()),
            *self._hide_binds(),
            *self._code_binds(),
            "--bind", str(sandbox_dir), str(sandbox_dir),
            "--unshare-pid",
            "--unshare-ipc",
            "--new-session",
            "--chdir", str(sandbox_dir / "home"),
            "--",
            *agent,
        ]  # fmt: skip

    def _hide_binds(self) -> list[str]:
        binds: list[str] = []
        for path in self.hidden:
            if path.is_dir():
                binds += ["--tmpfs", str(path)]
            elif path.exists():
                binds += ["--ro-bind", "/dev/null", str(path)]
        return binds

    def _code_binds(self) -> list[str]:
        """Read-only binds that bring back the agent's Python and code when they live where the sandbox
        sees an empty directory (a checkout or virtualenv under /tmp, or under the state directory)."""
        wanted = {Path(sys.prefix), Path(sys.base_prefix), Path(self.python).parent.parent,
                  Path(browservm.__file__).resolve().parent.parent}  # fmt: skip
        masked = [Path("/tmp"), self.state_dir.resolve(), *(p for p in self.hidden if p.is_dir())]  # noqa: S108
        binds: list[str] = []
        for path in sorted(wanted):
            if path.is_dir() and any(path.resolve().is_relative_to(m) for m in masked):
                binds += ["--ro-bind", str(path), str(path)]
        return binds

    # ------------------------------------------------------------------ lifecycle

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        if spec.network.egress_allow:
            raise SandboxUnsupported(
                spec.sandbox_id,
                "the process backend shares the host network and cannot enforce an egress policy yet; "
                "create the sandbox without network.egress_allow or use the qemu backend",
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
        try:
            (sandbox_dir / "home").mkdir(parents=True, mode=0o700)
            (sandbox_dir / "run").mkdir(mode=0o700)
            return await asyncio.to_thread(self._start, spec.sandbox_id, spec.role, sandbox_dir, spec.env)
        except BaseException:
            await self.destroy(
                SandboxHandle(spec.sandbox_id, self.name, spec.role, {"dir": str(sandbox_dir), "pid": None})
            )
            raise

    def _start(
        self, sandbox_id: str, role: Role, sandbox_dir: Path, extra_env: Mapping[str, str] | None = None
    ) -> SandboxHandle:
        bwrap = self.bwrap_usable()
        # Not the controller's environment: it holds secrets (vault keys, database URL) a guest must not see.
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(sandbox_dir / "home"),
            "PYTHONUNBUFFERED": "1",
            MARKER_ENV: str(sandbox_dir),
            "BROWSERVM_SANDBOX_ID": sandbox_id,
            **dict(extra_env or {}),
        }
        with contextlib.suppress(FileNotFoundError):
            (sandbox_dir / "run" / "agent.sock").unlink()
        with (sandbox_dir / "run" / "agent.log").open("ab") as agent_log:
            try:
                process = subprocess.Popen(
                    self._command(sandbox_id, role, sandbox_dir, bwrap),
                    stdin=subprocess.DEVNULL,
                    stdout=agent_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=sandbox_dir / "home",
                    start_new_session=True,
                )
            except OSError as exc:
                raise SandboxError(sandbox_id, f"cannot start the guest agent: {exc}") from exc
        self._children[sandbox_id] = process
        try:
            start_time = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess as exc:
            raise SandboxError(
                sandbox_id, "the guest agent exited at once", detail=_tail(sandbox_dir / "run" / "agent.log")
            ) from exc
        log.info("sandbox.started", sandbox_id=sandbox_id, pid=process.pid, bwrap=bwrap)
        return SandboxHandle(
            sandbox_id=sandbox_id,
            backend=self.name,
            role=role,
            runtime={
                "pid": process.pid,
                "pgid": process.pid,
                "start_time": start_time,
                "dir": str(sandbox_dir),
                "socket": str(sandbox_dir / "run" / "agent.sock"),
                "bwrap": bwrap,
                "netns": None,
            },
        )

    async def connect(self, handle: SandboxHandle, *, timeout_s: float) -> Channel:
        socket = Path(handle.runtime["socket"])
        agent_log = Path(handle.runtime["dir"]) / "run" / "agent.log"
        deadline = time.monotonic() + timeout_s
        while True:
            if self._liveness(handle) != Liveness.ALIVE:
                raise SandboxError(
                    handle.sandbox_id, "the guest agent is not running", detail=_tail(agent_log)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxBootTimeout(handle.sandbox_id, timeout_s, _tail(agent_log))
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket))
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
            raise SandboxBootTimeout(handle.sandbox_id, timeout_s, _tail(agent_log)) from exc
        except (protocol.ProtocolError, ConnectionError, Exception) as exc:
            writer.close()
            raise SandboxError(
                handle.sandbox_id, f"the guest agent's handshake failed: {exc}", detail=_tail(agent_log)
            ) from exc

    async def destroy(self, handle: SandboxHandle) -> None:
        # A handle with no runtime (an orphan found by list_orphans) is found by its id alone.
        if not handle.runtime.get("dir"):
            handle = replace(handle, runtime={**handle.runtime, "dir": str(self._dir_of(handle.sandbox_id))})
        await asyncio.to_thread(self._stop_processes, handle)
        await asyncio.to_thread(shutil.rmtree, handle.runtime["dir"], ignore_errors=True)
        log.info("sandbox.destroyed", sandbox_id=handle.sandbox_id)

    def _dir_of(self, sandbox_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", sandbox_id):
            raise SandboxError(sandbox_id, "not a sandbox id this backend creates")
        return self.sandboxes_dir / sandbox_id

    async def probe(self, handle: SandboxHandle) -> Liveness:
        return self._liveness(handle)

    async def hibernate(self, handle: SandboxHandle) -> SandboxHandle:
        if handle.role != "cli":
            raise SandboxUnsupported(
                handle.sandbox_id, "only CLI sandboxes hibernate; a browser sandbox is destroyed instead"
            )
        await asyncio.to_thread(self._stop_processes, handle)
        sandbox_dir = Path(handle.runtime["dir"])
        (sandbox_dir / HIBERNATED_MARKER).write_text(f"{time.time()}\n")
        return SandboxHandle(
            handle.sandbox_id, self.name, handle.role, {**handle.runtime, "pid": None, "start_time": None}
        )

    async def resume(self, handle: SandboxHandle) -> SandboxHandle:
        sandbox_dir = Path(handle.runtime["dir"])
        if self._liveness(handle) == Liveness.ALIVE:
            return handle
        if not (sandbox_dir / HIBERNATED_MARKER).exists():
            raise SandboxError(handle.sandbox_id, f"{sandbox_dir} holds no hibernated sandbox to resume")
        resumed = await asyncio.to_thread(self._start, handle.sandbox_id, handle.role, sandbox_dir)
        (sandbox_dir / HIBERNATED_MARKER).unlink()
        return resumed

    async def list_orphans(self, known: Sequence[str]) -> list[str]:
        known_ids = set(known)
        found: set[str] = set()
        if self.sandboxes_dir.is_dir():
            found |= {entry.name for entry in self.sandboxes_dir.iterdir() if entry.is_dir()}
        prefix = str(self.sandboxes_dir) + os.sep
        for process in await asyncio.to_thread(_marked_processes, None):
            marker = _environ(process).get(MARKER_ENV, "")
            if marker.startswith(prefix):
                found.add(marker[len(prefix) :])
        return sorted(found - known_ids)

    async def readiness(self) -> BackendReadiness:
        problems: list[str] = []
        check = await asyncio.create_subprocess_exec(
            self.python,
            "-c",
            "import browservm.guest.agent",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await check.communicate()
        if check.returncode != 0:
            problems.append(f"{self.python} cannot import the guest agent: {stderr.decode()[-300:]}")
        for tool in ("Xvfb", "x11vnc"):
            if shutil.which(tool) is None:
                problems.append(
                    f"{tool} is missing (apt-get install xvfb x11vnc): browser sandboxes cannot run"
                )
        if not any(shutil.which(c) for c in ("/usr/lib/chromium/chromium", "chromium")):
            problems.append("chromium is missing (apt-get install chromium): browser sandboxes cannot run")
        bwrap = await asyncio.to_thread(self.bwrap_usable)
        isolation = "bubblewrap" if bwrap else "no bubblewrap (agents run unconfined)"
        if problems:
            return BackendReadiness(False, "; ".join(problems))
        return BackendReadiness(True, f"ok: {isolation}; network shared with the host")

    # ------------------------------------------------------------------ processes

    def _agent_process(self, handle: SandboxHandle) -> psutil.Process | None:
        """The sandbox's top process if it still runs, never a stranger that reused its pid."""
        child = self._children.get(handle.sandbox_id)
        if child is not None and child.poll() is not None:
            self._children.pop(handle.sandbox_id, None)
        pid, start_time = handle.runtime.get("pid"), handle.runtime.get("start_time")
        if pid is None or start_time is None:
            return None
        try:
            process = psutil.Process(pid)
            if process.create_time() != start_time or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None

    def _liveness(self, handle: SandboxHandle) -> Liveness:
        if self._agent_process(handle) is not None:
            return Liveness.ALIVE
        sandbox_dir = handle.runtime.get("dir")
        if sandbox_dir and (Path(sandbox_dir) / HIBERNATED_MARKER).exists():
            return Liveness.HIBERNATED
        return Liveness.GONE

    def _stop_processes(self, handle: SandboxHandle) -> None:
        """SIGTERM the agent (it stops its services), SIGKILL whatever is left after the grace period."""
        top = self._agent_process(handle)
        tree: list[psutil.Process] = []
        if top is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = [top, *top.children(recursive=True)]
        sandbox_dir = handle.runtime.get("dir")
        stragglers = _marked_processes(sandbox_dir) if sandbox_dir else []
        everyone = {p.pid: p for p in [*tree, *stragglers]}
        # SIGTERM only the agent: it stops its services in order. Not bwrap: the namespace init ignores
        # it, and a terminated outer bwrap only slows the init's exit down (measured: 1 s -> 3.8 s).
        for process in everyone.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if _is_agent(process):
                    process.send_signal(signal.SIGTERM)
        alive = _wait_gone(list(everyone.values()), STOP_GRACE_S)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        _wait_gone(alive, STOP_GRACE_S)
        child = self._children.pop(handle.sandbox_id, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_GRACE_S)


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
