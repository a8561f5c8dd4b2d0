"""A small client of QEMU's machine protocol (QMP) on a VM's unix socket.

Blocking on purpose, and used from a thread (``asyncio.to_thread``): a conversation is a few short
requests, and handing QEMU a file descriptor (``getfd``) needs ``sendmsg`` with ``SCM_RIGHTS``, which
asyncio's streams do not offer. Events QEMU sends between answers are skipped.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any


class QmpError(Exception):
    """QEMU answered with an error, or the socket failed; the message says which command."""


class Qmp:
    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> Qmp:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot connect to QEMU's QMP socket {self.path}: {exc}") from exc
        self._sock = sock
        greeting = self._message()
        if "QMP" not in greeting:
            raise QmpError(f"{self.path} is not a QMP socket (it said {greeting!r})")
        self.execute("qmp_capabilities")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"reading from {self.path}: {exc}") from exc
            if not chunk:
                raise QmpError(f"QEMU closed its QMP socket {self.path}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        """Run ``command``; its ``return`` value. ``fd`` travels with it (for ``getfd``)."""
        assert self._sock is not None
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        try:
            if fd is not None:
                socket.send_fds(self._sock, [data], [fd])
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise QmpError(f"{command}: cannot send to {self.path}: {exc}") from exc
        while True:
            message = self._message()
            if "event" in message:
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            return message.get("return")

    def wait_migration(self, timeout_s: float) -> dict[str, Any]:
        """Poll ``query-migrate`` until the migration completed; raise if it failed or took too long."""
        deadline = time.monotonic() + timeout_s
        while True:
            status: dict[str, Any] = self.execute("query-migrate")
            state = status.get("status")
            if state == "completed":
                return status
            if state in ("failed", "cancelled"):
                raise QmpError(f"migration {state}: {status.get('error-desc', 'no reason given')}")
            if time.monotonic() >= deadline:
                raise QmpError(f"migration still {state} after {timeout_s:.0f} s")
            time.sleep(0.05)
