"""The pseudo-terminal a login CLI runs in, and what it prints, as text.

The CLI gets a wide terminal (its own session, the pty as controlling terminal). Its output is cleaned of
ANSI and OSC sequences (OSC 8 hyperlink targets are kept as candidate URLs) into a bounded
:class:`Transcript`; terminal queries (cursor position, device attributes, colours) are answered so that
terminal UIs do not wait on them.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fcntl
import logging
import os
import pty
import re
import shutil
import struct
import termios
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TERMINAL_COLUMNS = 512
"""Wide, so that terminal UIs do not wrap long authorization URLs across lines."""
TERMINAL_ROWS = 50
TAIL_LINES = 15
_TRANSCRIPT_CHARS = 64 * 1024
READ_SIZE = 65536

_OSC = re.compile(r"\x1b\]([^\x07\x1b]*)(?:\x07|\x1b\\)")
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_OTHER_ESCAPE = re.compile(r"\x1b[ -/]*[0-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INCOMPLETE_ESCAPE = re.compile(r"\x1b(?:\][^\x07\x1b]*\x1b?|\[[0-?]*[ -/]*|[ -/]*)?\Z")
_OSC8_TARGET = re.compile(r"^8;[^;]*;(\S+)$")

# Queries some terminal UIs send and then wait on; the answers describe a plain 80s-style terminal.
_TERMINAL_QUERIES: tuple[tuple[bytes, bytes], ...] = (
    (b"\x1b[6n", f"\x1b[{TERMINAL_ROWS};1R".encode()),
    (b"\x1b[c", b"\x1b[?62;22c"),
    (b"\x1b[0c", b"\x1b[?62;22c"),
    (b"\x1b]10;?\x07", b"\x1b]10;rgb:ffff/ffff/ffff\x07"),
    (b"\x1b]11;?\x07", b"\x1b]11;rgb:0000/0000/0000\x07"),
    (b"\x1b]10;?\x1b\\", b"\x1b]10;rgb:ffff/ffff/ffff\x1b\\"),
    (b"\x1b]11;?\x1b\\", b"\x1b]11;rgb:0000/0000/0000\x1b\\"),
)

_SECRETS = (
    re.compile(r"(?i)\b((?:code|access_token|refresh_token|id_token|token)=)[^&\s]+"),
    re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"),  # JWTs
    re.compile(r"\b(?:sk-ant-|ya29\.|1//|demo-[ar]t-)[\w.\-/]+"),
)
_BOX_ONLY = re.compile(r"^[\s\u2500-\u259f\u2800-\u28ff]*$")


def terminal_text(raw: str) -> tuple[str, list[str]]:
    """Output with escape sequences removed, and the OSC 8 hyperlink targets found in it."""
    links = []
    for match in _OSC.finditer(raw):
        target = _OSC8_TARGET.match(match.group(1))
        if target:
            links.append(target.group(1))
    text = _OSC.sub("", raw)
    text = _CSI.sub("", text)
    text = _OTHER_ESCAPE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text), links


def redact(line: str) -> str:
    """The line with tokens, codes and JWTs replaced by ``[redacted]`` (a parameter's name stays)."""

    def hide(match: re.Match[str]) -> str:
        return (match.group(1) if match.re.groups else "") + "[redacted]"

    for pattern in _SECRETS:
        line = pattern.sub(hide, line)
    return line


_LONG_URL = re.compile(r"\b(https?://[^\s?#]+)[?#]\S*")
SHORT_CHARS = 300


def short(text: str, limit: int = SHORT_CHARS) -> str:
    """``text`` as a reason a person reads: URLs without their query (a sign-in URL's parameters are
    noise, and may hold a state or code), whitespace folded, at most ``limit`` characters."""
    text = _LONG_URL.sub(lambda m: m.group(1) + "?…", redact(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Transcript:
    """The CLI's cleaned output: a bounded window with absolute offsets, and its last lines."""

    def __init__(self) -> None:
        self.text = ""
        self.base = 0
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def end(self) -> int:
        return self.base + len(self.text)

    def feed(self, data: bytes, *, final: bool = False) -> list[str]:
        """Add raw output; returns the hyperlink targets it completed."""
        raw = self._pending + self._decoder.decode(data, final=final)
        # An escape sequence cut by the read boundary waits for its end (unless absurdly long).
        incomplete = _INCOMPLETE_ESCAPE.search(raw)
        if incomplete and not final and len(raw) - incomplete.start() < 4096:
            raw, self._pending = raw[: incomplete.start()], raw[incomplete.start() :]
        else:
            self._pending = ""
        text, links = terminal_text(raw)
        self.text += text
        if len(self.text) > _TRANSCRIPT_CHARS:
            cut = len(self.text) - _TRANSCRIPT_CHARS
            self.text = self.text[cut:]
            self.base += cut
        return links

    def since(self, offset: int) -> tuple[str, int]:
        """The text from absolute ``offset`` on (or from the window's start), and where it starts."""
        start = max(offset, self.base)
        return self.text[start - self.base :], start

    def tail(self, lines: int = TAIL_LINES) -> str:
        kept: deque[str] = deque(maxlen=lines)
        previous = None
        for line in self.text.splitlines():
            line = re.sub(r"\s{3,}", "  ", line).strip()
            if not line or _BOX_ONLY.match(line) or line == previous:
                continue
            kept.append(redact(line))
            previous = line
        return "\n".join(kept)


class Terminal:
    """A CLI in a pseudo-terminal. Each read of its output goes into :attr:`transcript`, then to
    ``on_output`` with the hyperlink targets that read completed."""

    def __init__(self, on_output: Callable[[list[str]], None]) -> None:
        self.transcript = Transcript()
        self._on_output = on_output
        self._master_fd: int | None = None

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0))
        os.set_blocking(master, False)
        self._master_fd = master
        setsid = shutil.which("setsid")
        if setsid is not None:
            # util-linux setsid execs the CLI (same pid: not a group leader, so no fork) in a new session
            # with the pty as controlling terminal. A preexec_fn could do it without the binary, but
            # forking with a Python callback is unsafe while other threads run (it broke here).
            argv = [setsid, "--ctty", *argv]
        else:
            log.warning("login.no_setsid: the CLI runs without a controlling terminal (install util-linux)")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=setsid is None,
            )
        finally:
            os.close(slave)
        asyncio.get_running_loop().add_reader(master, self._readable)
        return process

    def _readable(self) -> None:
        assert self._master_fd is not None
        try:
            data = os.read(self._master_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: every process holding the pty's other end has gone.
            if exc.errno != errno.EIO:
                log.warning("login.terminal_read_failed error=%s", exc)
            self.close()
            return
        if not data:
            self.close()
            return
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        for query, answer in _TERMINAL_QUERIES:
            if query in data:
                self.write(answer)
        self._on_output(self.transcript.feed(data))

    def drain(self) -> None:
        """Read what the CLI left in the terminal (it has exited)."""
        while self._master_fd is not None:
            try:
                data = os.read(self._master_fd, READ_SIZE)
            except OSError:
                break
            if not data:
                break
            self._handle(data)
        self.transcript.feed(b"", final=True)

    def write(self, data: bytes) -> None:
        if self._master_fd is None:
            return
        try:
            os.write(self._master_fd, data)
        except OSError as exc:
            log.warning("login.terminal_write_failed error=%s", exc)

    def close(self) -> None:
        if self._master_fd is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._master_fd)
        os.close(self._master_fd)
        self._master_fd = None
