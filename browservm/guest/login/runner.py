"""The login runner: one provider CLI's sign-in, from its start to its credential files moved out.

The guest agent creates a :class:`LoginRunner` per session and calls :meth:`~LoginRunner.start`; the
runner reports through ``emit``:

``starting`` → ``awaiting_user`` (the authorization URL is open in the browser) → ``credentials_ready``
(the files are complete; ``account`` says whose) — or ``failed`` (the CLI ended first; ``detail`` has
its last output lines) or ``expired`` (nothing within ``timeout_s``).

How it drives a CLI:

* The CLI runs in a pseudo-terminal (:mod:`~browservm.guest.login.terminal`) with ``HOME``, ``DISPLAY``,
  and ``BROWSER`` pointing at the hook (:mod:`~browservm.guest.login.hook`) that hands its URL over.
* The terminal output, cleaned to text, is matched against the provider's URL patterns and prompts.
  Prompts are answered by pattern, never by timing.
* The first URL the provider accepts (a loopback callback, a client id) is opened with ``open_url``.
* Completion is the credential files being complete and parseable (watched by their size and mtime,
  parsed when they change), never the CLI's words. The CLI is then stopped at once (SIGTERM, SIGKILL):
  refresh tokens rotate, and only the CLI sandbox may use them from now on. Never a logout.

:meth:`~LoginRunner.collect` then returns the delivery set, as often as it is asked (a controller that
died before storing it asks again). The files stay in the sandbox until it is destroyed, and the CLI that
wrote them never runs again: credentials are moved, never used from two places.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.guest.login.hook import BrowserHook
from browservm.guest.login.terminal import TERMINAL_COLUMNS, TERMINAL_ROWS, Terminal, short
from browservm.guest.providers import CredentialsIncomplete, Provider, get_provider

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""SIGTERM, then this long for the CLI to exit before SIGKILL."""
COMPLETE_GRACE_S = 2.0
"""Once the credentials are complete, how long the CLI may take to finish its callback and exit itself."""
OPEN_RETRY_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Waits between attempts to load a sign-in page that did not load, the last one repeated."""
WATCH_INTERVAL_S = 0.2
"""How often the credential files' size and mtime are checked (a stat each; parsing only on change)."""
_URL_WINDOW_CHARS = 16 * 1024


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
        self.hook = BrowserHook(lambda url: self._offer_url(url, "browser hook"))
        self._process: asyncio.subprocess.Process | None = None
        self._terminal = Terminal(self._on_output)
        self._prompt_state: list[tuple[int, int]] = []
        """Per provider prompt: (times answered, absolute offset its next match must start from)."""
        self._supervisor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ignored_urls: set[str] = set()
        self._files: dict[str, bytes] | None = None
        self._delivery: list[protocol.FileBlob] | None = None
        """What :meth:`collect` hands over, built once."""
        self._finished = asyncio.Event()
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
            # The CLI's own wait for the browser must not end before ours: the login ends as the session does.
            self.env["BROWSERVM_LOGIN_TIMEOUT_S"] = f"{self.timeout_s:g}"
            argv = provider.command(self.env)
            hook = await self.hook.start()
            self.home.mkdir(parents=True, exist_ok=True)
            provider.prepare_home(self.home)
            self._process = await self._terminal.spawn(argv, self._cli_env(provider, hook), self.home)
            log.info("login.started provider=%s pid=%s", self.provider_name, self._process.pid)
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"login-{self.provider_name}")

    @property
    def pid(self) -> int | None:
        """The CLI's process id once it was started."""
        return self._process.pid if self._process is not None else None

    async def wait(self) -> protocol.LoginState:
        """The state the login ended in: ``credentials_ready``, ``failed`` or ``expired``."""
        await self._finished.wait()
        assert self.state is not None
        return self.state

    async def collect(self) -> list[protocol.FileBlob]:
        """Stop the CLI (never a logout) and return the delivery set. Asking again returns it again.

        The files stay in this sandbox's home until the sandbox is destroyed, which the controller does
        once it has sealed and stored them: a controller that died before storing them collects them
        again after its restart. The CLI that wrote them never runs again, so no token is used twice.
        """
        provider = self._provider
        if provider is None or self._files is None:
            state = self.state.state if self.state else "not started"
            raise LoginNotReady(
                f"no complete credentials to collect (login is {state}); wait for credentials_ready"
            )
        if self._delivery is None:
            await self._stop_cli()
            # Read again: what is on disk now, after the CLI stopped, is what the CLI user gets.
            files = self._read_files(provider)
            try:
                provider.validate(files, cli_exited=True)
            except CredentialsIncomplete:
                files = self._files
            self._delivery = provider.delivery(files)
            log.info(
                "login.collected provider=%s files=%s", self.provider_name, [b.path for b in self._delivery]
            )
        return list(self._delivery)

    async def stop(self) -> None:
        """Stop the CLI and the hook, remove the hook directory. Idempotent; emits nothing."""
        self._stopped = True
        await cancel_and_wait([self._supervisor, *self._background])
        await self._stop_cli()
        self._terminal.close()
        await self.hook.close()
        self._finished.set()

    # ------------------------------------------------------------------ setting up

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
                if exited.done():
                    self._terminal.drain()
                    code = process.returncode
                    detail = f"{self.provider_name} login exited with status {code} before signing in"
                    tail = self._terminal.transcript.tail(lines=5)
                    self._finish(
                        protocol.LoginState(
                            state="failed",
                            url=self.url,
                            detail=short(f"{detail}; it said: {tail}" if tail else detail),
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

    def _on_output(self, links: list[str]) -> None:
        for link in links:
            self._offer_url(link, "hyperlink")
        self._find_urls()
        self._answer_prompts()

    def _find_urls(self) -> None:
        provider = self._provider
        if provider is None or self.url is not None:
            return
        transcript = self._terminal.transcript
        window, _ = transcript.since(transcript.end - _URL_WINDOW_CHARS)
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
            text, start = self._terminal.transcript.since(offset)
            match = prompt.pattern.search(text)
            if match is None:
                continue
            self._prompt_state[index] = (times + 1, start + match.end())
            log.info(
                "login.prompt_answered provider=%s prompt=%r", self.provider_name, prompt.pattern.pattern
            )
            self._terminal.write(prompt.answer.encode())

    # ------------------------------------------------------------------ the URL

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
        """Show the sign-in page; while it does not load (the provider, or the way to it, is down for a
        moment), say so and try again with backoff. The URL is the session's from the first attempt on:
        the login ends only when the CLI gives up, the user signs in, or the time runs out."""
        attempt = 0
        while not self._finished.is_set():
            try:
                await self.open_url(url)
            except Exception as exc:
                delay = OPEN_RETRY_S[min(attempt, len(OPEN_RETRY_S) - 1)]
                log.warning(
                    "login.open_url_failed provider=%s attempt=%s retry_in_s=%s error=%s",
                    self.provider_name, attempt + 1, delay, exc,
                )  # fmt: skip
                if attempt == 0:
                    detail = f"the sign-in page did not load ({type(exc).__name__}: {exc}); trying again"
                    self._emit(protocol.LoginState(state="awaiting_user", url=url, detail=short(detail)))
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if attempt == 0 or (self.state is not None and self.state.detail):
                self._emit(protocol.LoginState(state="awaiting_user", url=url))
            return

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
