"""What a CLI sandbox does for the controller: write files into the user's home, and run commands there.

Every path that arrives over the channel is relative to the home directory and must stay inside it:
absolute paths, ``..`` and symlinks that lead out are refused (:class:`BadPath`, code ``bad_path``).
Files are written atomically (a temp file beside the target, fsync, rename, fsync of the directory), so
a CLI never reads half a credential file, even if the guest loses power mid-write.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import os
import signal
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel

from browservm import protocol

OUTPUT_CHUNK = 64 * 1024


class FileRequestError(Exception):
    """A write or exec request the agent refuses; ``code`` goes into the Reply's error."""

    code = "bad_request"


class BadPath(FileRequestError):
    code = "bad_path"


def path_in_home(home: Path, relative: str) -> Path:
    """The absolute path of ``relative`` under ``home``, or :class:`BadPath` if it would leave it."""
    pure = PurePosixPath(relative)
    if not relative or "\0" in relative:
        raise BadPath(f"path {relative!r} is empty or contains NUL")
    if pure.is_absolute():
        raise BadPath(f"path {relative!r} is absolute; give it relative to the home directory")
    if ".." in pure.parts:
        raise BadPath(f"path {relative!r} climbs out with '..'")
    root = home.resolve()
    target = root.joinpath(*pure.parts)
    # Symlinks already in the home could point anywhere: the directory the file lands in must resolve
    # inside the home. The file itself may be a symlink: rename replaces the link, not what it points to.
    if not target.parent.resolve().is_relative_to(root):
        raise BadPath(f"path {relative!r} leads out of the home directory through a symlink")
    return target


def write_files(home: Path, files: Sequence[protocol.FileBlob]) -> list[str]:
    """Write every file atomically with its mode; all paths are checked before any file is written."""
    planned: list[tuple[Path, bytes, int]] = []
    for blob in files:
        target = path_in_home(home, blob.path)
        try:
            content = base64.b64decode(blob.content_b64, validate=True)
        except binascii.Error as exc:
            raise FileRequestError(f"content of {blob.path!r} is not valid base64: {exc}") from exc
        if not 0 <= blob.mode <= 0o7777:
            raise FileRequestError(f"mode {blob.mode:o} of {blob.path!r} is not a file mode")
        if blob.merge == "json":
            try:
                update = json.loads(content)
            except ValueError as exc:
                raise FileRequestError(
                    f"content of {blob.path!r} is not JSON, so it cannot merge: {exc}"
                ) from exc
            if not isinstance(update, dict):
                raise FileRequestError(f"content of {blob.path!r} must be a JSON object to merge")
            content = _merged(target, update)
        planned.append((target, content, blob.mode))
    for target, content, mode in planned:
        _write_atomically(target, content, mode)
    return [str(target.relative_to(home.resolve())) for target, _, _ in planned]


def merge_json(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: objects merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_json(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merged(target: Path, update: dict[str, Any]) -> bytes:
    """The merged content for ``target``. A file there that is not a JSON object is kept aside as
    ``<name>.unreadable`` rather than lost."""
    try:
        current = json.loads(target.read_bytes())
    except FileNotFoundError:
        current = {}
    except (OSError, ValueError):
        current = None
    if not isinstance(current, dict):
        os.replace(target, target.with_name(target.name + ".unreadable"))
        current = {}
    return json.dumps(merge_json(current, update), indent=2).encode()


def _write_atomically(target: Path, content: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, target)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ExecRunner:
    """Runs commands in the home directory, one task each, reporting output and exit as events."""

    def __init__(self, home: Path, base_env: Mapping[str, str], emit: Callable[[BaseModel], None]) -> None:
        self.home = home
        self.base_env = dict(base_env)
        self.emit = emit
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, request: protocol.Exec) -> str:
        """Start the command; returns its exec id at once (output follows as events)."""
        cwd = path_in_home(self.home, request.cwd) if request.cwd else self.home.resolve()
        try:
            stdin = base64.b64decode(request.stdin_b64, validate=True) if request.stdin_b64 else None
        except binascii.Error as exc:
            raise FileRequestError(f"stdin_b64 is not valid base64: {exc}") from exc
        try:
            process = await asyncio.create_subprocess_exec(
                *request.argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env={**self.base_env, **request.env},
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise FileRequestError(f"cannot run {request.argv[0]!r}: {exc}") from exc
        exec_id = f"x{next(self._ids)}"
        task = asyncio.create_task(self._follow(exec_id, process, stdin, request.timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return exec_id

    async def _follow(
        self, exec_id: str, process: asyncio.subprocess.Process, stdin: bytes | None, timeout_s: float
    ) -> None:
        async def feed() -> None:
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):
                process.stdin.write(stdin or b"")
                await process.stdin.drain()
            process.stdin.close()

        async def pump(stream: asyncio.StreamReader | None, name: Literal["stdout", "stderr"]) -> None:
            assert stream is not None
            while chunk := await stream.read(OUTPUT_CHUNK):
                self.emit(
                    protocol.ExecOutput(
                        exec_id=exec_id,
                        stream=name,
                        data_b64=base64.b64encode(chunk).decode(),
                    )
                )

        pumps = [pump(process.stdout, "stdout"), pump(process.stderr, "stderr")]
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
        assert process.returncode is not None
        self.emit(protocol.ExecExit(exec_id=exec_id, exit_code=process.returncode, timed_out=timed_out))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
