"""Runs each guest service as its own subprocess and keeps it running.

One :class:`Supervisor` per agent. Every :class:`Service` gets its own runner task: spawn, wait for the
service's *real* readiness signal (a display number written, DevTools answering, an RFB banner), then wait
for it to exit. A service that dies is restarted with exponential backoff (0.5 s doubling to 10 s, back
to 0.5 s once it had been healthy for 60 s) without touching the other services. Each change is reported
as a :class:`~browservm.protocol.ServiceState` through the ``emit`` callback.

Every service runs in its own process group (so a stop reaches its helpers too, e.g. Chromium's zygote)
and gets ``PR_SET_PDEATHSIG``, so nothing outlives an agent that is killed outright. Its stdout and
stderr go through the agent into a size-bounded log file in the run dir; the tail of that log is the
``detail`` of a failure.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from browservm import protocol
from browservm.aio import cancel_and_wait, wait_exited

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_RESET_S = 60.0
STOP_GRACE_S = 3.0
PUMP_DRAIN_S = 1.0

LOG_MAX_BYTES = 1024 * 1024
"""A service's log file is rotated to ``<name>.log.1`` past this size: at most twice this on disk."""
TAIL_BYTES = 2048


class ServiceUnavailable(Exception):
    """The service cannot run on this guest at all (binary or module missing). Not retried."""


class ServiceNotReady(Exception):
    """The service started but did not give its readiness signal; the message says what was seen."""


class ServiceLog:
    """A service's output: a log file rotated at :data:`LOG_MAX_BYTES`, and its tail kept in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._file = path.open("ab")

    def write(self, data: bytes) -> None:
        if self._file.tell() + len(data) > LOG_MAX_BYTES:
            self._file.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._file = self.path.open("ab")
        self._file.write(data)
        self._file.flush()
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    def note(self, line: str) -> None:
        """A line from the supervisor itself (why a service was restarted), marked as such."""
        self.write(f"[supervisor] {line}\n".encode())

    def tail(self) -> str:
        return b"".join(self._tail)[-TAIL_BYTES:].decode(errors="replace")

    def close(self) -> None:
        self._file.close()


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
# Looked up here, in the parent: between fork and exec the child must not dlopen or take locks that
# another thread of the agent (asyncio's child watchers) may hold.


def _child_setup(fds: Mapping[int, int]) -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when the agent dies, and put
    # each inherited descriptor at the number the program expects (via a high copy, so that a source that
    # already sits at another target's number is not overwritten first).
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    copies = {target: fcntl.fcntl(source, fcntl.F_DUPFD, 64) for target, source in fds.items()}
    for target, copy in copies.items():
        os.dup2(copy, target)


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_to: ServiceLog,
    cwd: Path | None = None,
    fds: Mapping[int, int] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own process group, its output pumped into ``log_to``. ``fds`` maps a
    descriptor number the program expects to one of ours it gets there (e.g. ``{3: read_end}``)."""
    fds = dict(fds or {})
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(fds),
            start_new_session=True,
            preexec_fn=functools.partial(_child_setup, fds),  # the agent's loop runs in its only thread
        )
    except FileNotFoundError as exc:
        raise ServiceUnavailable(f"{argv[0]} is not installed in this guest: {exc}") from exc
    log_to.note(f"started pid {process.pid}: {' '.join(argv)}")
    return process


async def _pump(process: asyncio.subprocess.Process, log_to: ServiceLog) -> None:
    assert process.stdout is not None
    while chunk := await process.stdout.read(65536):
        log_to.write(chunk)


def kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def stop_process(process: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; also reaps stragglers of the group.

    Returns whether the process itself had to be killed (it ignored SIGTERM for ``grace_s``).
    """
    kill_group(process.pid, signal.SIGTERM)
    killed = False
    try:
        await asyncio.wait_for(wait_exited(process), grace_s)
    except TimeoutError:
        killed = True
    kill_group(process.pid, signal.SIGKILL)
    await wait_exited(process)
    return killed


class Service(abc.ABC):
    """One supervised program. Subclasses say how to start it and what its readiness signal is."""

    name: protocol.ServiceName
    requires: tuple[protocol.ServiceName, ...] = ()
    """Services that must be ready before this one is (re)started (Chromium needs the display)."""
    ready_timeout_s: float = 30.0

    @abc.abstractmethod
    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        """Spawn the program (through :func:`spawn`). Raise :class:`ServiceUnavailable` if it cannot run."""

    @abc.abstractmethod
    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        """Return once the service really works; raise :class:`ServiceNotReady` if it never will."""

    async def exited(self) -> None:
        """Called after the process is gone (clean up sockets, connections)."""


@dataclasses.dataclass
class ServiceStatus:
    state: protocol.ServiceStateName = "starting"
    restarts: int = 0
    pid: int | None = None
    detail: str = ""
    log: str = ""

    def report(self) -> protocol.ServiceReport:
        return protocol.ServiceReport(**dataclasses.asdict(self))


class _Runner:
    def __init__(self, supervisor: Supervisor, service: Service) -> None:
        self.supervisor = supervisor
        self.service = service
        self.status = ServiceStatus()
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.log = ServiceLog(supervisor.log_dir / f"{service.name}.log")
        self.status.log = str(self.log.path)
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        """Set by :meth:`stop`: no restart after this, even if a cancellation were lost on the way."""

    def _set(self, state: protocol.ServiceStateName, detail: str = "") -> None:
        self.status.state = state
        self.status.detail = detail
        self.supervisor.emit(
            protocol.ServiceState(
                service=self.service.name, state=state, restarts=self.status.restarts, detail=detail
            )
        )

    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        self._set("starting")
        while not self.stopping:
            for name in self.service.requires:
                await self.supervisor.wait_ready(name)
            try:
                healthy_s, why = await self._run_once()
            except ServiceUnavailable as exc:
                self.log.note(f"unavailable: {exc}")
                self._set("failed", str(exc))
                return
            if self.stopping:
                return
            if healthy_s >= HEALTHY_RESET_S:
                delay = BACKOFF_FIRST_S
            self.status.restarts += 1
            self.log.note(f"{why}; restarting in {delay:.1f}s")
            self._set("restarting", f"{why}; log tail:\n{self.log.tail()}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _run_once(self) -> tuple[float, str]:
        """One life of the process: (seconds it was ready, why it ended)."""
        process = await self.service.start(self.log)
        self.process = process
        self.status.pid = process.pid
        pump = asyncio.create_task(_pump(process, self.log))
        exited = asyncio.create_task(wait_exited(process))
        ready_since: float | None = None
        try:
            readiness = asyncio.create_task(self.service.wait_ready(process))
            done, _ = await asyncio.wait(
                {readiness, exited}, timeout=self.service.ready_timeout_s, return_when="FIRST_COMPLETED"
            )
            if readiness in done and readiness.exception() is None:
                ready_since = time.monotonic()
                self.ready.set()
                self._set("ready")
                await exited
                why = f"exited with status {process.returncode}"
            else:
                await cancel_and_wait([readiness])
                if exited in done:
                    why = f"exited with status {process.returncode} before it was ready"
                elif readiness in done:
                    why = f"not ready: {readiness.exception()}"
                else:
                    why = f"not ready after {self.service.ready_timeout_s:.0f}s"
        finally:
            self.ready.clear()
            # Helpers left in the group (Chromium renderers) go with it.
            started = time.monotonic()
            if await stop_process(process, grace_s=STOP_GRACE_S):
                self.log.note(f"ignored SIGTERM for {STOP_GRACE_S:.0f}s; killed")
            else:
                self.log.note(f"stopped in {time.monotonic() - started:.2f}s")
            exited.cancel()
            # The rest of its output, up to EOF; bounded, since a helper that left the group may hold it.
            await asyncio.wait({pump}, timeout=PUMP_DRAIN_S)
            if not pump.done():
                await cancel_and_wait([pump])
                # asyncio offers no public way to let go of a dead process's pipes; its transport's
                # close() does it (the helper gets EPIPE), instead of a leak until garbage collection.
                transport = getattr(process, "_transport", None)
                if transport is not None:
                    transport.close()
            self.status.pid = None
            self.process = None
            await self.service.exited()
        healthy_s = time.monotonic() - ready_since if ready_since is not None else 0.0
        return healthy_s, why

    async def stop(self) -> None:
        self.stopping = True
        process = self.process
        await cancel_and_wait([self.task])
        if process is not None and process.returncode is None:
            await stop_process(process)
        self.log.close()
        self.status.state = "stopped"


class Supervisor:
    def __init__(self, log_dir: Path, emit: Callable[[protocol.ServiceState], None]) -> None:
        self.log_dir = log_dir
        self.emit = emit
        self._runners: dict[str, _Runner] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, service: Service) -> None:
        """Run ``service`` from now on. Returns at once; readiness arrives as a ServiceState."""
        if service.name in self._runners:
            raise ValueError(f"service {service.name} is already supervised")
        runner = _Runner(self, service)
        self._runners[service.name] = runner
        runner.task = asyncio.create_task(runner.run(), name=f"service-{service.name}")

    async def wait_ready(self, name: str) -> None:
        runner = self._runners.get(name)
        if runner is None:
            raise KeyError(f"service {name} is not supervised")
        await runner.ready.wait()

    def is_ready(self, name: str) -> bool:
        runner = self._runners.get(name)
        return runner is not None and runner.ready.is_set()

    def statuses(self) -> dict[str, ServiceStatus]:
        return {name: runner.status for name, runner in self._runners.items()}

    def states(self) -> list[protocol.ServiceState]:
        """The latest state of each service, as the snapshot a new controller connection gets."""
        return [
            protocol.ServiceState(
                service=runner.service.name,
                state=runner.status.state,
                restarts=runner.status.restarts,
                detail=runner.status.detail,
            )
            for runner in self._runners.values()
        ]

    async def stop_all(self) -> None:
        """Stop every service (in reverse start order: dependents before what they need)."""
        for runner in reversed(list(self._runners.values())):
            await runner.stop()
            self.emit(protocol.ServiceState(service=runner.service.name, state="stopped"))
