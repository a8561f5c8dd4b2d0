"""The BROWSER hook: how a login CLI's "open this URL in a browser" reaches the login runner.

A private directory (mode 700) holds a script, installed as ``BROWSER`` and as ``xdg-open`` first on
``PATH`` (Node CLIs open URLs through ``xdg-open``). It sends its URL argument over a unix socket in that
directory and exits 0 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

LINE_WAIT_S = 5.0


class BrowserHook:
    def __init__(self, on_url: Callable[[str], None]) -> None:
        self._on_url = on_url
        self._dir: Path | None = None
        self._server: asyncio.Server | None = None

    @property
    def directory(self) -> Path | None:
        """The hook's private directory while it exists."""
        return self._dir

    async def start(self) -> Path:
        """Create the hook; returns the script's path (its directory goes first on the CLI's ``PATH``)."""
        self._dir = Path(tempfile.mkdtemp(prefix="browservm-login-"))  # mode 700
        socket_path = self._dir / "hook.sock"
        self._server = await asyncio.start_unix_server(self._on_connection, path=str(socket_path))
        bin_dir = self._dir / "bin"
        bin_dir.mkdir()
        hook = bin_dir / "browser-open"
        # -I -S: isolated and without site-packages, so it starts in milliseconds and trusts no env.
        hook.write_text(
            f"#!{sys.executable} -IS\n"
            "import socket, sys\n"
            "sock = socket.socket(socket.AF_UNIX)\n"
            "sock.settimeout(5)\n"
            "try:\n"
            f"    sock.connect({str(socket_path)!r})\n"
            "    sock.sendall(' '.join(sys.argv[1:]).encode() + b'\\n')\n"
            "except OSError:\n"
            "    pass\n"
        )
        hook.chmod(0o700)
        (bin_dir / "xdg-open").symlink_to(hook.name)
        return hook

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=LINE_WAIT_S)
        except (TimeoutError, ValueError, OSError):
            line = b""
        finally:
            writer.close()
        url = line.decode("utf-8", "replace").strip()
        if url:
            self._on_url(url)

    async def close(self) -> None:
        """Stop listening and remove the hook's directory. Idempotent."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
