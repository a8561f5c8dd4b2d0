"""A real HTTP proxy for egress tests: tinyproxy (Debian's tinyproxy-bin, scripts/apt-packages.txt),
listening on the sandbox network's gateway, leaving from an address of its own (its "exit"), asking for
Basic credentials, and logging every client and request."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

_CONNECT = re.compile(r"Connect \(file descriptor (\d+)\): (\S+)")
_REQUEST = re.compile(r"Request \(file descriptor (\d+)\): (\S+) (\S+)")


@dataclass(frozen=True)
class Seen:
    client: str
    """The address the request came from (a guest's, or the controller's for a check)."""
    method: str
    url: str


class Tinyproxy:
    def __init__(
        self, directory: Path, *, listen: str, port: int, exit_address: str, users: Mapping[str, str]
    ) -> None:
        if shutil.which("tinyproxy") is None:
            pytest.fail(
                "tinyproxy is not installed: bash scripts/setup.sh installs it (scripts/apt-packages.txt)"
            )
        self.directory = directory
        self.listen, self.port, self.exit_address = listen, port, exit_address
        self.users = dict(users)
        self.log = directory / f"tinyproxy-{port}.log"
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Tinyproxy:
        config = self.directory / f"tinyproxy-{self.port}.conf"
        lines = [
            f"Port {self.port}",
            f"Listen {self.listen}",
            f"Bind {self.exit_address}",
            "Timeout 60",
            f'LogFile "{self.log}"',
            "LogLevel Connect",
            "MaxClients 50",
            "DisableViaHeader Yes",
            *(f"BasicAuth {user} {password}" for user, password in self.users.items()),
        ]
        config.write_text("\n".join(lines) + "\n")
        self._process = await asyncio.create_subprocess_exec(
            "tinyproxy",
            "-d",
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):  # listening once a connection is accepted
            with contextlib.suppress(OSError):
                _r, writer = await asyncio.open_connection(self.listen, self.port)
                writer.close()
                return self
            await asyncio.sleep(0.05)
        raise AssertionError(f"tinyproxy did not listen on {self.listen}:{self.port}; see {self.log}")

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
        self._process = None

    def seen(self) -> list[Seen]:
        """Every request it took, with the client it came from."""
        clients: dict[str, str] = {}
        found = []
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        for line in text.splitlines():
            if match := _CONNECT.search(line):
                clients[match.group(1)] = match.group(2)
            elif match := _REQUEST.search(line):
                found.append(Seen(clients.get(match.group(1), "?"), match.group(2), match.group(3)))
        return found
