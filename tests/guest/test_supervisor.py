"""The supervisor with real child processes: restarts with backoff, failures, bounded logs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from browservm import protocol
from browservm.guest import supervisor as supervision
from browservm.guest.supervisor import Service, ServiceLog, Supervisor, spawn


class ShellService(Service):
    """A shell one-liner as a service; ready as soon as it has printed its first line."""

    def __init__(self, name: protocol.ServiceName, script: str, argv0: str = "sh") -> None:
        self.name = name
        self.script = script
        self.argv0 = argv0
        self.started_at: list[float] = []
        self._log: ServiceLog | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        self.started_at.append(time.monotonic())
        self._log = log_to
        return await spawn([self.argv0, "-c", self.script], env={"PATH": "/usr/bin:/bin"}, log_to=log_to)

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        assert self._log is not None
        while "up" not in self._log.tail():
            await asyncio.sleep(0.01)


async def collect(queue: asyncio.Queue[protocol.ServiceState], until: int) -> list[protocol.ServiceState]:
    states: list[protocol.ServiceState] = []
    async with asyncio.timeout(10):
        while len(states) < until:
            states.append(await queue.get())
    return states


async def test_a_dying_service_restarts_with_backoff_and_leaves_the_others_alone(tmp_path: Path) -> None:
    queue: asyncio.Queue[protocol.ServiceState] = asyncio.Queue()
    supervisor = Supervisor(tmp_path / "logs", queue.put_nowait)
    steady = ShellService("xvfb", "echo up; exec sleep 30")
    flaky = ShellService("chromium", "echo up; echo crashing >&2; exit 3")
    supervisor.start(steady)
    supervisor.start(flaky)
    try:
        states = await collect(queue, 8)
        flaky_states = [(s.state, s.restarts) for s in states if s.service == "chromium"]
        assert flaky_states[:4] == [("starting", 0), ("ready", 0), ("restarting", 1), ("ready", 1)]
        assert [(s.state, s.restarts) for s in states if s.service == "xvfb"] == [
            ("starting", 0),
            ("ready", 0),
        ]
        restarting = next(s for s in states if s.state == "restarting")
        assert "exited with status 3" in restarting.detail
        assert "crashing" in restarting.detail, "the failure carries the log tail"
        # 0.5 s before the first restart, doubling after (lower bounds: a busy machine only adds to them).
        await collect(queue, 2)
        gaps = [b - a for a, b in zip(flaky.started_at, flaky.started_at[1:], strict=False)]
        assert 0.5 <= gaps[0] < 5
        assert 1.0 <= gaps[1] < 6
        assert supervisor.statuses()["xvfb"].restarts == 0
        assert supervisor.statuses()["xvfb"].pid is not None
    finally:
        await supervisor.stop_all()
    assert {s.state for s in supervisor.statuses().values()} == {"stopped"}


async def test_an_exit_is_noticed_while_a_helper_that_left_the_group_holds_the_output(tmp_path: Path) -> None:
    """asyncio's Process.wait() also waits for the output pipe to close: a helper that left the service's
    process group and kept its stdout must not hide the service's death (nor hang its stop)."""
    queue: asyncio.Queue[protocol.ServiceState] = asyncio.Queue()
    supervisor = Supervisor(tmp_path / "logs", queue.put_nowait)
    escaped = tmp_path / "escaped"
    helper = f"setsid sh -c 'touch {escaped}; exec sleep 20' &"  # out of the group before the shell exits
    wait = f"while [ ! -e {escaped} ]; do sleep 0.01; done"
    supervisor.start(ShellService("chromium", f"{helper} {wait}; echo up; exit 3"))
    try:
        states = await collect(queue, 3)
        assert [s.state for s in states] == ["starting", "ready", "restarting"]
        assert "exited with status 3" in states[2].detail
        started = time.monotonic()
        async with asyncio.timeout(10):
            await supervisor.stop_all()
        assert time.monotonic() - started < 5, "the stop waited for the helper's pipe"
        assert supervisor.statuses()["chromium"].state == "stopped"
        assert [s.state for s in drain(queue)][-1] == "stopped"
    finally:
        for pid in _pids_of("sleep 20"):
            os.kill(pid, signal.SIGKILL)


def _pids_of(cmdline: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or ()) == cmdline]


def drain(queue: asyncio.Queue[protocol.ServiceState]) -> list[protocol.ServiceState]:
    states = []
    while not queue.empty():
        states.append(queue.get_nowait())
    return states


async def test_a_service_that_cannot_run_fails_once_with_the_reason(tmp_path: Path) -> None:
    queue: asyncio.Queue[protocol.ServiceState] = asyncio.Queue()
    supervisor = Supervisor(tmp_path / "logs", queue.put_nowait)
    supervisor.start(ShellService("vnc", "true", argv0="/nonexistent/x11vnc"))
    try:
        starting, failed = await collect(queue, 2)
        assert (starting.state, failed.state) == ("starting", "failed")
        assert "/nonexistent/x11vnc is not installed" in failed.detail
        await asyncio.sleep(0.7)  # longer than the first backoff: it must not be retried
        assert queue.empty()
    finally:
        await supervisor.stop_all()


def test_service_logs_are_bounded(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path / "chatty.log")
    line = b"x" * 1023 + b"\n"
    for _ in range(3 * supervision.LOG_MAX_BYTES // len(line)):
        log.write(line)
    log.close()
    assert (tmp_path / "chatty.log").stat().st_size <= supervision.LOG_MAX_BYTES
    assert (tmp_path / "chatty.log.1").stat().st_size <= supervision.LOG_MAX_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatty.log", "chatty.log.1"]
    assert len(log.tail()) <= supervision.TAIL_BYTES
    assert log.tail().endswith("x\n")


_SUPERVISED_SLEEPER = """
import asyncio, sys
from pathlib import Path
from browservm.guest.supervisor import Service, Supervisor, spawn

class Sleeper(Service):
    name = "xvfb"
    async def start(self, log_to):
        return await spawn(["sleep", "300"], env={"PATH": "/usr/bin:/bin"}, log_to=log_to)
    async def wait_ready(self, process):
        print(process.pid, flush=True)

async def main():
    supervisor = Supervisor(Path(sys.argv[1]), lambda state: None)
    supervisor.start(Sleeper())
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_services_die_with_an_agent_that_is_killed_outright(tmp_path: Path) -> None:
    import sys

    import psutil

    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SUPERVISED_SLEEPER, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert agent.stdout is not None
    service: psutil.Process | None = None
    try:
        async with asyncio.timeout(10):
            service_pid = int(await agent.stdout.readline())
        service = psutil.Process(service_pid)
        assert service.name() == "sleep"
        agent.kill()
        await agent.wait()
        # No agent, no service: PR_SET_PDEATHSIG, since nothing else would ever stop it.
        await asyncio.to_thread(service.wait, 5)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        if service is not None and service.is_running():
            service.kill()
