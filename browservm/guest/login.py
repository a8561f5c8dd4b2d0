"""The login runner: one provider CLI's sign-in, from its start to its credential files moved out.

The guest agent creates a :class:`LoginRunner` per session and calls :meth:`~LoginRunner.start`; the
runner reports through ``emit``:

``starting`` → ``awaiting_user`` (the authorization URL is open in the browser) → ``credentials_ready``
(the files are complete; ``account`` says whose) — or ``failed`` (the CLI ended first; ``detail`` has
its last output lines) or ``expired`` (nothing within ``timeout_s``).

How it drives a CLI:

* The CLI runs in a pseudo-terminal (its own session, the pty as controlling terminal), with ``HOME``,
  ``DISPLAY``, and ``BROWSER`` pointing at a hook script in a private directory. The same hook is
  installed as ``xdg-open`` first on ``PATH``, because Node CLIs open URLs through ``xdg-open``. The hook
  sends its URL argument over a unix socket to the runner and exits 0 at once.
* The terminal output, with ANSI and OSC sequences removed (OSC 8 hyperlink targets are kept as
  candidate URLs), is matched against the provider's URL patterns and prompts. Prompts are answered by
  pattern, never by timing. Terminal queries (cursor position, device attributes, colours) are answered
  so that terminal UIs do not wait on them.
* The first URL the provider accepts (a loopback callback, a client id) is opened with ``open_url``.
* Completion is the credential files being complete and parseable (watched by their size and mtime,
  parsed when they change), never the CLI's words. The CLI is then stopped at once (SIGTERM, SIGKILL):
  refresh tokens rotate, and only the CLI sandbox may use them from now on. Never a logout.

:meth:`~LoginRunner.collect` then returns the delivery set and deletes the files: credentials are
moved, never copied.
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
import signal
import struct
import sys
import tempfile
import termios
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.guest.providers import CredentialsIncomplete, Provider, get_provider

log = logging.getLogger(__name__)

TERMINAL_COLUMNS = 512
"""Wide, so that terminal UIs do not wrap long authorization URLs across lines."""
TERMINAL_ROWS = 50
STOP_GRACE_S = 3.0
"""SIGTERM, then this long for the CLI to exit before SIGKILL."""
COMPLETE_GRACE_S = 2.0
"""Once the credentials are complete, how long the CLI may take to finish its callback and exit itself."""
WATCH_INTERVAL_S = 0.2
"""How often the credential files' size and mtime are checked (a stat each; parsing only on change)."""
TAIL_LINES = 15
_TRANSCRIPT_CHARS = 64 * 1024
_URL_WINDOW_CHARS = 16 * 1024

# ---------------------------------------------------------------------------------------------- terminal text

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


class _Transcript:
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


# ---------------------------------------------------------------------------------------------- runner


class LoginNotReady(Exception):
    """``collect`` was called before the credentials were complete, or after they were collected."""


class LoginRunner:
    def __init__(
        self,
        provider: str,
        options: dict[str, str],
        home: Path,
        env: dict[str, str],
        open_url: Callable[[str], Awaitable[None]],
        emit: Callable[[protocol.LoginState], None],
        timeout_s: float,
    ) -> None:
        self.provider_name = provider
        self.options = dict(options)
        self.home = Path(home)
        self.env = dict(env)
        self.open_url = open_url
        self.timeout_s = timeout_s
        self._emit_to = emit
        self.state: protocol.LoginState | None = None
        self.url: str | None = None
        self._provider: Provider | None = None
        self._hook_dir: Path | None = None
        self._hook_server: asyncio.Server | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._master_fd: int | None = None
        self._transcript = _Transcript()
        self._prompt_state: list[tuple[int, int]] = []
        """Per provider prompt: (times answered, absolute offset its next match must start from)."""
        self._supervisor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._open_failure: str | None = None
        self._ignored_urls: set[str] = set()
        self._files: dict[str, bytes] | None = None
        self._finished = asyncio.Event()
        self._collected = False
        self._stopped = False

    # ------------------------------------------------------------------ public surface

    async def start(self) -> None:
        """Start the CLI's login; returns once it runs. Progress arrives through ``emit``."""
        if self._provider is not None:
            raise RuntimeError("this LoginRunner was already started; create a new one per login")
        provider = get_provider(self.provider_name, self.options)
        self._provider = provider
        self._prompt_state = [(0, 0) for _ in provider.prompts]
        self._emit(protocol.LoginState(state="starting"))
        try:
            argv = provider.command(self.env)
            hook = await self._start_hook()
            self.home.mkdir(parents=True, exist_ok=True)
            provider.prepare_home(self.home)
            await self._spawn(argv, self._cli_env(provider, hook))
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"login-{self.provider_name}")

    async def wait(self) -> protocol.LoginState:
        """The state the login ended in: ``credentials_ready``, ``failed`` or ``expired``."""
        await self._finished.wait()
        assert self.state is not None
        return self.state

    async def collect(self) -> list[protocol.FileBlob]:
        """Stop the CLI (never a logout), return the delivery set, delete the files from this home."""
        provider = self._provider
        if provider is None or self._files is None:
            state = self.state.state if self.state else "not started"
            raise LoginNotReady(
                f"no complete credentials to collect (login is {state}); wait for credentials_ready"
            )
        if self._collected:
            raise LoginNotReady("the credentials were already collected and removed from this sandbox")
        await self._stop_cli()
        # Read again: what is on disk now, after the CLI stopped, is what the CLI user gets.
        files = self._read_files(provider)
        try:
            provider.validate(files, cli_exited=True)
        except CredentialsIncomplete:
            files = self._files
        blobs = provider.delivery(files)
        for relative in provider.credential_files:
            (self.home / relative).unlink(missing_ok=True)
        self._collected = True
        self._files = {}
        log.info("login.collected provider=%s files=%s", self.provider_name, [b.path for b in blobs])
        return blobs

    async def stop(self) -> None:
        """Stop the CLI and the hook, remove the hook directory. Idempotent; emits nothing."""
        self._stopped = True
        await cancel_and_wait([self._supervisor, *self._background])
        await self._stop_cli()
        self._close_terminal()
        if self._hook_server is not None:
            self._hook_server.close()
            with contextlib.suppress(Exception):
                await self._hook_server.wait_closed()
            self._hook_server = None
        if self._hook_dir is not None:
            shutil.rmtree(self._hook_dir, ignore_errors=True)
            self._hook_dir = None
        self._finished.set()

    # ------------------------------------------------------------------ setting up

    async def _start_hook(self) -> Path:
        """The BROWSER hook: a script that sends its URL over a unix socket we listen on."""
        self._hook_dir = Path(tempfile.mkdtemp(prefix="browservm-login-"))  # mode 700
        socket_path = self._hook_dir / "hook.sock"
        self._hook_server = await asyncio.start_unix_server(self._on_hook, path=str(socket_path))
        bin_dir = self._hook_dir / "bin"
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

    def _cli_env(self, provider: Provider, hook: Path) -> dict[str, str]:
        env = dict(self.env)
        for name in provider.unset_env:
            env.pop(name, None)
        path = env.get("PATH") or os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
        env.update(
            HOME=str(self.home),
            BROWSER=str(hook),
            PATH=f"{hook.parent}{os.pathsep}{path}",
            TERM=env.get("TERM") or "xterm-256color",
            COLUMNS=str(TERMINAL_COLUMNS),
            LINES=str(TERMINAL_ROWS),
        )
        if "DISPLAY" not in env and os.environ.get("DISPLAY"):
            env["DISPLAY"] = os.environ["DISPLAY"]
        env.update(provider.env(self.home))
        return env

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
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
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.home,
                env=env,
                start_new_session=setsid is None,
            )
        finally:
            os.close(slave)
        asyncio.get_running_loop().add_reader(master, self._on_output)
        log.info("login.started provider=%s pid=%s", self.provider_name, self._process.pid)

    # ------------------------------------------------------------------ watching

    async def _supervise(self) -> None:
        try:
            await self._watch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug here must not leave the session hanging in awaiting_user until it expires.
            log.exception("login.watch_failed provider=%s", self.provider_name)
            await self._stop_cli()
            self._finish(
                protocol.LoginState(state="failed", url=self.url, detail=f"login runner error: {exc!r}")
            )

    async def _watch(self) -> None:
        provider = self._provider
        process = self._process
        assert provider is not None and process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        exited = asyncio.ensure_future(process.wait())
        signature: object = None
        try:
            while True:
                await asyncio.wait({exited}, timeout=max(0.0, min(WATCH_INTERVAL_S, deadline - loop.time())))
                current = self._signature(provider)
                if current != signature or exited.done():
                    signature = current
                    if self._try_complete(provider, cli_exited=exited.done()):
                        # The CLI may still be answering the browser's callback with its success page;
                        # let it finish and exit on its own, briefly, before it is stopped.
                        await asyncio.wait({exited}, timeout=COMPLETE_GRACE_S)
                        await self._stop_cli()
                        self._try_complete(provider, cli_exited=True)  # what it left on disk, if it rewrote
                        self._finish(
                            protocol.LoginState(
                                state="credentials_ready",
                                url=self.url,
                                account=provider.account(self._files or {}),
                            )
                        )
                        return
                if self._open_failure is not None:
                    await self._stop_cli()
                    self._finish(protocol.LoginState(state="failed", url=self.url, detail=self._open_failure))
                    return
                if exited.done():
                    self._drain_output()
                    code = process.returncode
                    detail = f"{self.provider_name} login exited with status {code} before signing in"
                    tail = self._transcript.tail()
                    self._finish(
                        protocol.LoginState(
                            state="failed",
                            url=self.url,
                            detail=f"{detail}; last output:\n{tail}" if tail else detail,
                        )
                    )
                    return
                if loop.time() >= deadline:
                    await self._stop_cli()
                    self._finish(
                        protocol.LoginState(
                            state="expired",
                            url=self.url,
                            detail=f"no sign-in completed within {self.timeout_s:g} s; start a new session",
                        )
                    )
                    return
        finally:
            exited.cancel()

    def _signature(self, provider: Provider) -> tuple[tuple[int, int] | None, ...]:
        result: list[tuple[int, int] | None] = []
        for relative in provider.credential_files:
            try:
                stat = (self.home / relative).stat()
            except OSError:
                result.append(None)
            else:
                result.append((stat.st_mtime_ns, stat.st_size))
        return tuple(result)

    def _read_files(self, provider: Provider) -> dict[str, bytes]:
        files = {}
        for relative in provider.credential_files:
            with contextlib.suppress(OSError):
                files[relative] = (self.home / relative).read_bytes()
        return files

    def _try_complete(self, provider: Provider, *, cli_exited: bool) -> bool:
        files = self._read_files(provider)
        try:
            provider.validate(files, cli_exited=cli_exited)
        except CredentialsIncomplete as exc:
            if files:
                log.debug("login.incomplete provider=%s reason=%s", self.provider_name, exc)
            return False
        self._files = files
        return True

    def _finish(self, state: protocol.LoginState) -> None:
        log.info("login.%s provider=%s", state.state, self.provider_name)
        self._emit(state)
        self._finished.set()

    def _emit(self, state: protocol.LoginState) -> None:
        self.state = state
        self._emit_to(state)

    # ------------------------------------------------------------------ the terminal

    def _on_output(self) -> None:
        assert self._master_fd is not None
        try:
            data = os.read(self._master_fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO: every process holding the pty's other end has gone.
            if exc.errno != errno.EIO:
                log.warning("login.terminal_read_failed error=%s", exc)
            self._close_terminal()
            return
        if not data:
            self._close_terminal()
            return
        self._handle_output(data)

    def _handle_output(self, data: bytes) -> None:
        for query, answer in _TERMINAL_QUERIES:
            if query in data:
                self._write(answer)
        links = self._transcript.feed(data)
        for link in links:
            self._offer_url(link, "hyperlink")
        self._find_urls()
        self._answer_prompts()

    def _drain_output(self) -> None:
        while self._master_fd is not None:
            try:
                data = os.read(self._master_fd, 65536)
            except OSError:
                break
            if not data:
                break
            self._handle_output(data)
        self._transcript.feed(b"", final=True)

    def _find_urls(self) -> None:
        provider = self._provider
        if provider is None or self.url is not None:
            return
        window, _ = self._transcript.since(self._transcript.end - _URL_WINDOW_CHARS)
        for pattern in provider.url_patterns:
            for match in pattern.finditer(window):
                # A URL running into the end of the output may continue in the next read.
                if match.end() < len(window):
                    self._offer_url(match.group(0), "output")

    def _answer_prompts(self) -> None:
        provider = self._provider
        if provider is None:
            return
        for index, prompt in enumerate(provider.prompts):
            times, offset = self._prompt_state[index]
            if times >= prompt.times:
                continue
            text, start = self._transcript.since(offset)
            match = prompt.pattern.search(text)
            if match is None:
                continue
            self._prompt_state[index] = (times + 1, start + match.end())
            log.info(
                "login.prompt_answered provider=%s prompt=%r", self.provider_name, prompt.pattern.pattern
            )
            self._write(prompt.answer.encode())

    def _write(self, data: bytes) -> None:
        if self._master_fd is None:
            return
        try:
            os.write(self._master_fd, data)
        except OSError as exc:
            log.warning("login.terminal_write_failed error=%s", exc)

    def _close_terminal(self) -> None:
        if self._master_fd is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._master_fd)
        os.close(self._master_fd)
        self._master_fd = None

    # ------------------------------------------------------------------ the URL

    async def _on_hook(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
        except (TimeoutError, ValueError, OSError):
            line = b""
        finally:
            writer.close()
        url = line.decode("utf-8", "replace").strip()
        if url:
            self._offer_url(url, "browser hook")

    def _offer_url(self, url: str, source: str) -> None:
        provider = self._provider
        if provider is None or self.url is not None or self._stopped or self._finished.is_set():
            return
        if not provider.accepts_url(url):
            if url not in self._ignored_urls:  # terminal UIs redraw: say it once
                self._ignored_urls.add(url)
                log.info("login.url_ignored provider=%s source=%s", self.provider_name, source)
            return
        self.url = url
        log.info("login.url_captured provider=%s source=%s", self.provider_name, source)
        task = asyncio.get_running_loop().create_task(self._open(url))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _open(self, url: str) -> None:
        try:
            await self.open_url(url)
        except Exception as exc:
            log.warning("login.open_url_failed provider=%s error=%s", self.provider_name, exc)
            self._open_failure = (
                f"could not open the sign-in page in the browser: {type(exc).__name__}: {exc}"
            )
            return
        if not self._finished.is_set():
            self._emit(protocol.LoginState(state="awaiting_user", url=url))

    # ------------------------------------------------------------------ stopping

    async def _stop_cli(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            self._kill_group(signal.SIGKILL)  # leftovers of an exited CLI (helpers it spawned)
            return
        self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("login.kill provider=%s after_s=%s", self.provider_name, STOP_GRACE_S)
        self._kill_group(signal.SIGKILL)
        await process.wait()

    def _kill_group(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        # The CLI leads its own session (setsid), so its group id is its pid; helpers it spawned share it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
