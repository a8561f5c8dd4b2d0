"""Commands the controller runs in a CLI sandbox, as its user, in its home (the ``exec`` request).

Each command runs in its own session and process group; its output is reported as ``exec_output``
events on the connection that started it, and its end as one ``exec_exit``. A timeout kills the group.

Flow control: a command may have ``window_bytes`` of output sent and not yet acknowledged by the
controller (``exec_credit``). With its window used up, its pipes are not read: the command blocks on its
next write, as in a shell pipeline whose reader is slow, and the channel carries on for everyone else.
What the agent holds per command is bounded by the window plus a pipe reader's buffer. When the reader
goes away (``exec_close``, or its connection ends) the pipes are closed: the command's next write fails
with ``EPIPE``, as when a pipeline's reader exits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from browservm import protocol
from browservm.guest.files import path_in_home

OUTPUT_CHUNK = 64 * 1024
"""Most output in one ``exec_output`` event; a pipe's reader also buffers at most twice this."""
MAX_RUNNING = 16
"""Commands running at once; one more is refused ``busy`` (each may hold a window of output)."""


class _Command:
    """One running command's output pipes and its flow-control window."""

    def __init__(self, exec_id: str, peer: protocol.Peer, window: int) -> None:
        self.exec_id = exec_id
        self.peer = peer
        """The connection that started it: its output goes there and nowhere else."""
        self.credit = window
        self.detached = False
        self._credit_changed = asyncio.Event()
        self.pipes: list[asyncio.ReadTransport] = []

    async def reserve(self, most: int) -> int:
        """Wait for credit; take up to ``most`` of it. 0 once nobody reads this command any more."""
        while self.credit <= 0 and not self.detached:
            self._credit_changed.clear()
            await self._credit_changed.wait()
        if self.detached:
            return 0
        granted = min(most, self.credit)
        self.credit -= granted
        return granted

    def grant(self, size: int) -> None:
        self.credit += size
        self._credit_changed.set()

    def detach(self) -> None:
        self.detached = True
        self._credit_changed.set()
        for pipe in self.pipes:
            pipe.close()


async def _read_pipe() -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
    """A pipe for a child's output: the write end to hand to it, and our reading end."""
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader(limit=OUTPUT_CHUNK)  # pauses the pipe past twice this unread
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    return write_fd, reader, transport


class ExecRunner:
    """Runs commands in the home directory, one task each, reporting output and exit as events."""

    def __init__(self, home: Path, base_env: Mapping[str, str]) -> None:
        self.home = home
        self.base_env = dict(base_env)
        self._ids = itertools.count(1)
        self._commands: dict[str, _Command] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: protocol.Exec, peer: protocol.Peer) -> str:
        """Start the command; returns its exec id at once (output follows as events on ``peer``)."""
        if len(self._commands) >= MAX_RUNNING:
            raise protocol.RequestError(
                "busy", f"{MAX_RUNNING} commands are running in this sandbox; wait for one to end"
            )
        cwd = path_in_home(self.home, request.cwd) if request.cwd else self.home.resolve()
        try:
            stdin = base64.b64decode(request.stdin_b64, validate=True) if request.stdin_b64 else None
        except binascii.Error as exc:
            raise protocol.RequestError("bad_request", f"stdin_b64 is not valid base64: {exc}") from exc
        command = _Command(f"x{next(self._ids)}", peer, request.window_bytes)
        out_fd, stdout, out_pipe = await _read_pipe()
        err_fd, stderr, err_pipe = await _read_pipe()
        command.pipes = [out_pipe, err_pipe]
        try:
            process = await asyncio.create_subprocess_exec(
                *request.argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=out_fd,
                stderr=err_fd,
                cwd=cwd,
                env={**self.base_env, **request.env},
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            command.detach()
            raise protocol.RequestError("bad_request", f"cannot run {request.argv[0]!r}: {exc}") from exc
        finally:
            os.close(out_fd)  # the child has them now: our copies would keep its pipes open for ever
            os.close(err_fd)
        self._commands[command.exec_id] = command
        task = asyncio.create_task(self._follow(command, process, stdout, stderr, stdin, request.timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return command.exec_id

    def grant(self, exec_id: str, size: int) -> None:
        """The controller took ``size`` more bytes of this command's output (``exec_credit``)."""
        command = self._commands.get(exec_id)
        if command is not None:
            command.grant(size)

    def close_output(self, exec_id: str) -> None:
        """Nobody reads this command's output any more (``exec_close``)."""
        command = self._commands.get(exec_id)
        if command is not None:
            command.detach()

    def detach(self, peer: protocol.Peer) -> None:
        """The connection ``peer`` ended: nobody reads the output of the commands it started."""
        for command in list(self._commands.values()):
            if command.peer is peer:
                command.detach()

    async def _follow(
        self,
        command: _Command,
        process: asyncio.subprocess.Process,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        stdin: bytes | None,
        timeout_s: float,
    ) -> None:
        async def feed() -> None:
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):
                process.stdin.write(stdin or b"")
                await process.stdin.drain()
            process.stdin.close()

        async def pump(stream: asyncio.StreamReader, name: Literal["stdout", "stderr"]) -> None:
            while granted := await command.reserve(OUTPUT_CHUNK):
                chunk = await stream.read(granted)
                command.grant(granted - len(chunk))  # what this read did not use
                if not chunk:
                    return
                command.peer.send(
                    protocol.ExecOutput(
                        exec_id=command.exec_id, stream=name, data_b64=base64.b64encode(chunk).decode()
                    )
                )

        pumps = [pump(stdout, "stdout"), pump(stderr, "stderr")]
        if stdin is not None:
            pumps.append(feed())
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.gather(*pumps, process.wait()), timeout_s)
        except TimeoutError:
            # Timed out is the command itself still running; a background child that merely kept its
            # output open is killed too, but does not make the command's own exit a timeout.
            timed_out = process.returncode is None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            command.detach()
            self._commands.pop(command.exec_id, None)
        assert process.returncode is not None
        command.peer.send(
            protocol.ExecExit(exec_id=command.exec_id, exit_code=process.returncode, timed_out=timed_out)
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
