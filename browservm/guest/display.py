"""The guest's screen: an Xvfb display and a kiosk Chromium on it, driven over DevTools.

Xvfb writes its display number to ``-displayfd`` once it accepts clients: that is its readiness signal.
It listens on neither TCP nor the abstract unix socket (``-nolisten local``, checked on Xvfb 21.1.7), only
on ``/tmp/.X11-unix/X<n>``, and under bubblewrap each sandbox has a private ``/tmp``.

The display number is not left to Xvfb. Abstract unix sockets belong to the *network* namespace, which
sandboxes still share with the host, and Xlib tries ``@/tmp/.X11-unix/X<n>`` before the file: with
every sandbox on ``:0``, its Chromium and x11vnc would reach any other X server on the host that listens
on the abstract ``:0`` (seen here: x11vnc's MIT-SHM attach refused, Chromium dying with a stranger's
display). So each sandbox picks a random number no socket in this network namespace uses, and keeps it
across Xvfb restarts (the login CLI's ``DISPLAY`` stays valid). A network namespace per sandbox (a later
issue) makes this moot.

Chromium runs full screen with the flags this project mandates and ``--remote-debugging-pipe``: the agent
speaks DevTools over two pipes (:mod:`browservm.guest.devtools`), so no port on a loopback that other
sandboxes may share offers control of the user's browser. It is ready once ``Browser.getVersion``
answers. :meth:`ChromiumService.open_url` navigates the page target and remembers the URL, so a Chromium
that crashed and was restarted comes back on the same page. ``debug_port`` (the controller's
``Debug.devtools_port``) adds a loopback DevTools port as well, for debugging and tests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from browservm import protocol
from browservm.guest.devtools import DevToolsError, DevToolsPipe
from browservm.guest.proxy_auth import ProxyAuth
from browservm.guest.supervisor import Service, ServiceLog, ServiceNotReady, ServiceUnavailable, spawn

log = structlog.get_logger(__name__)

MANDATORY_CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
"""Every Chromium this project starts runs with these (see the project rules)."""

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "chromium")
# The wrapper /usr/bin/chromium runs a shell memory check first; the real binary starts faster and its
# pid is the browser's own, so a kill of that pid is a kill of the browser.

POLL_S = 0.05
PAGE_LOAD_WAIT_S = 10.0
"""How long open_url waits for a page's load event before it reports the page open anyway."""
CHROMIUM_WAIT_S = 30.0
"""How long open_url waits for a starting or restarting Chromium (its own ready timeout)."""


def find_chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _devtools_port(port_file: Path) -> int | None:
    try:
        first = port_file.read_text().split()
    except FileNotFoundError:
        return None
    return int(first[0]) if first and first[0].isdigit() else None


DISPLAY_RANGE = (1000, 30000)


def pick_display_number() -> int:
    """A display number no X socket in this network namespace (abstract or file) nor lock file uses."""
    taken: set[int] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text(errors="replace").splitlines():
            _, _, name = line.rpartition(" ")
            if "/.X11-unix/X" in name:
                suffix = name.rsplit("X", 1)[1]
                if suffix.isdigit():
                    taken.add(int(suffix))
    while True:
        number = secrets.randbelow(DISPLAY_RANGE[1] - DISPLAY_RANGE[0]) + DISPLAY_RANGE[0]
        if number not in taken and not Path(f"/tmp/.X{number}-lock").exists():  # noqa: S108 - X's own path
            return number


class XvfbService(Service):
    name = "xvfb"
    ready_timeout_s = 15.0

    def __init__(self, screen: protocol.ScreenConfig, env: Mapping[str, str]) -> None:
        self.screen = screen
        self.env = dict(env)
        self.number = pick_display_number()
        self.display: str | None = None
        """``:N`` while Xvfb is ready, else ``None``."""
        self._read_fd: int | None = None

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        read_fd, write_fd = os.pipe()
        try:
            process = await spawn(
                [
                    "Xvfb",
                    f":{self.number}",
                    "-screen",
                    "0",
                    "{}x{}x24".format(*self.screen.largest),
                    "-nolisten",
                    "tcp",
                    "-nolisten",
                    "local",
                    # No server auto-repeat: the viewer's browser repeats a held key itself, and a key-up
                    # that arrives late (a busy guest, a slow network) must not type the key again.
                    "-r",
                    "-displayfd",
                    "3",
                ],
                env=self.env,
                log_to=log_to,
                fds={3: write_fd},
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._read_fd = read_fd
        return process

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        assert self._read_fd is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._read_fd, "rb", 0)
        )
        self._read_fd = None
        try:
            line = await reader.readline()
        finally:
            transport.close()
        number = line.strip().decode(errors="replace")
        if not number.isdigit():
            raise ServiceNotReady(f"Xvfb closed -displayfd without a display number ({line!r})")
        display = f":{number}"
        if self.screen.largest != (self.screen.width, self.screen.height):
            # Created at the largest size the screen may follow a viewer to; it starts at its own.
            await asyncio.to_thread(_set_screen_size, display, self.screen.width, self.screen.height)
        self.display = display

    async def exited(self) -> None:
        self.display = None
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None


class ChromiumService(Service):
    name = "chromium"
    requires = ("xvfb",)
    ready_timeout_s = 30.0

    def __init__(
        self,
        xvfb: XvfbService,
        screen: protocol.ScreenConfig,
        profile_dir: Path,
        env: Mapping[str, str],
        proxy: protocol.ProxyConfig | None = None,
        url: str | None = None,
        *,
        debug_port: bool = False,
    ) -> None:
        self.xvfb = xvfb
        self.screen = screen
        self.profile_dir = profile_dir
        self.env = dict(env)
        self.proxy = proxy
        self.url = url or "about:blank"
        """The page Chromium shows; reopened after a restart."""
        self.debug_port = debug_port
        self.devtools_port: int | None = None
        """The debugging port, when ``debug_port`` asked for one; the agent uses the pipe."""
        self.devtools: DevToolsPipe | None = None
        self._context: str | None = None
        """The session's browser context (with its proxy), once made in the running Chromium."""
        self._auth: ProxyAuth | None = None
        self._context_lock = asyncio.Lock()
        self._launched_url = self.url
        self._shown_url: str | None = None
        """The URL last navigated to (and loaded, or given up on) in the running Chromium."""
        self._ready = asyncio.Event()
        """Set while Chromium runs, answers DevTools and shows :attr:`url`."""

    def argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            *MANDATORY_CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile_dir}",
            "--remote-debugging-pipe",
            "--kiosk",
            "--start-fullscreen",
            "--window-position=0,0",
            f"--window-size={self.screen.width},{self.screen.height}",
            "--noerrdialogs",
            "--disable-infobars",
            "--disable-default-apps",
            "--password-store=basic",
            "--disable-features=Translate,MediaRouter",
        ]
        if self.debug_port:
            argv += ["--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
        # No --proxy-server: a session's proxy applies to a browser context of its own (use_proxy), so
        # a browser started before its session (the warm pool) serves any user's proxy.
        argv.append(self._launched_url)
        return argv

    async def start(self, log_to: ServiceLog) -> asyncio.subprocess.Process:
        binary = find_chromium()
        if binary is None:
            raise ServiceUnavailable(f"no Chromium found (looked for {', '.join(CHROMIUM_CANDIDATES)})")
        if self.xvfb.display is None:
            raise ServiceNotReady("the display went away before Chromium could start")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        # The profile is kept across restarts (the user's half-done sign-in survives a crash), but the
        # port file and the locks of the dead browser must go, or we would read a stale port.
        for stale in ("DevToolsActivePort", "SingletonLock", "SingletonSocket", "SingletonCookie"):
            with contextlib.suppress(FileNotFoundError):
                (self.profile_dir / stale).unlink()
        env = {**self.env, "DISPLAY": self.xvfb.display}
        self._ready.clear()
        # With a proxy the page is opened in its context once Chromium answers, never in the default one.
        self._launched_url = self.url if self.proxy is None else "about:blank"
        self._shown_url = self._launched_url
        devtools = DevToolsPipe()
        try:
            process = await spawn(self.argv(binary), env=env, log_to=log_to, fds=devtools.child_fds)
        except BaseException:
            devtools.close_unused()
            raise
        await devtools.open()
        self.devtools = devtools
        return process

    async def wait_ready(self, process: asyncio.subprocess.Process) -> None:
        assert self.devtools is not None
        # Chromium reads the pipe once its DevTools handler runs: the first answer is the signal.
        await self.devtools.call("Browser.getVersion", timeout_s=self.ready_timeout_s)
        if self.debug_port:
            port_file = self.profile_dir / "DevToolsActivePort"
            while True:  # written once the debugging port listens (soon after the pipe answered)
                port = _devtools_port(port_file)
                if port is not None:
                    break
                await asyncio.sleep(POLL_S)
            self.devtools_port = port
        if self.url != self._shown_url:
            # open_url arrived while this Chromium was starting: show that page, not the launch one.
            await self._navigate(self.url)
        self._ready.set()

    async def exited(self) -> None:
        self._ready.clear()
        self.devtools_port = None
        self._context = None  # gone with the browser; made again in the next one
        if self._auth is not None:
            await self._auth.close()
            self._auth = None
        if self.devtools is not None:
            await self.devtools.close()
            self.devtools = None

    async def open_url(self, url: str) -> None:
        """Show ``url`` and return once its page has loaded (or after :data:`PAGE_LOAD_WAIT_S`).

        Callers report the page as on screen when this returns (the login runner's ``awaiting_user``), so
        it waits for the load event, not just the navigation's commit. If Chromium is starting or
        restarting, it waits for it (at most :data:`CHROMIUM_WAIT_S`); if Chromium stays down, the URL
        is remembered and opened when it comes back.
        """
        self.url = url
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), CHROMIUM_WAIT_S)
            except TimeoutError:
                log.warning("chromium.down_on_open_url", url=url, waited_s=CHROMIUM_WAIT_S)
                return
            if self._shown_url == url:
                return  # the restarted Chromium opened it while coming up
        await self._navigate(url)

    async def use_proxy(self, proxy: protocol.ProxyConfig) -> None:
        """From now on the session's pages open in a browser context of their own that goes through
        ``proxy``, its authentication answered over the DevTools pipe (never on a command line). Made at
        once when Chromium runs, else when it is ready; again after a restart."""
        self.proxy = proxy
        if self._ready.is_set():
            await self._proxied_page()

    async def _proxied_page(self) -> dict[str, Any]:
        """The page target of the session's proxied context, made (with its window) when missing."""
        assert self.proxy is not None
        devtools = self._pipe()
        async with self._context_lock:
            if self._context is None:
                old_pages = [t for t in await self._targets() if t.get("type") == "page"]
                auth = ProxyAuth(devtools, self.proxy)
                await auth.start()  # before the first request of the context can ask for credentials
                created = await devtools.call(
                    "Target.createBrowserContext",
                    {
                        "proxyServer": self.proxy.url,
                        "proxyBypassList": ";".join(self.proxy.bypass),
                        "disposeOnDetach": False,
                    },
                )
                context = str(created["browserContextId"])
                auth.context = context
                self._auth, self._context = auth, context
                window = {"left": 0, "top": 0, "width": self.screen.width, "height": self.screen.height}
                await devtools.call(
                    "Target.createTarget",
                    {"url": "about:blank", "browserContextId": context, "newWindow": True, **window},
                )
                for page in old_pages:  # the user sees the session's window only
                    with contextlib.suppress(DevToolsError):
                        await devtools.call("Target.closeTarget", {"targetId": page["targetId"]})
                log.info("chromium.proxied_context", proxy=self.proxy.url)
            pages = [
                t
                for t in await self._targets()
                if t.get("type") == "page" and t.get("browserContextId") == self._context
            ]
        if not pages:
            raise DevToolsError("the session's browser window was closed")
        return pages[0]

    async def _targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = (await self._pipe().call("Target.getTargets"))["targetInfos"]
        return targets

    async def current_url(self) -> str:
        """The URL of the page target, as DevTools reports it."""
        return str((await self._page_target())["url"])

    def _pipe(self) -> DevToolsPipe:
        if self.devtools is None:
            raise DevToolsError("Chromium is not running")
        return self.devtools

    async def _page_target(self) -> dict[str, Any]:
        if self.proxy is not None:
            return await self._proxied_page()
        targets = await self._targets()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise DevToolsError("Chromium has no page target to navigate (did the kiosk window close?)")
        page: dict[str, Any] = pages[0]
        return page

    async def _navigate(self, url: str) -> None:
        """Navigate the page target to ``url`` and wait (bounded) for that document's load event."""
        devtools = self._pipe()
        target = await self._page_target()
        attached = await devtools.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session = attached["sessionId"]
        try:
            with devtools.events() as events:
                await devtools.call("Page.enable", session_id=session)
                await devtools.call("Page.setLifecycleEventsEnabled", {"enabled": True}, session_id=session)
                result = await devtools.call("Page.navigate", {"url": url}, session_id=session)
                if result.get("errorText"):
                    raise DevToolsError(f"Chromium could not open the page: {result['errorText']}")
                self._shown_url = url
                loader = result.get("loaderId")
                if loader is None:
                    return  # a same-document navigation (a fragment): nothing more loads
                try:
                    async with asyncio.timeout(PAGE_LOAD_WAIT_S):
                        while not _is_load_of(await events.get(), session, loader):
                            pass
                except TimeoutError:
                    # A slow subresource must not hold the sign-in up: the document itself is on screen.
                    log.warning("chromium.page_load_slow", url=url, waited_s=PAGE_LOAD_WAIT_S)
        finally:
            with contextlib.suppress(DevToolsError):
                await devtools.call("Target.detachFromTarget", {"sessionId": session})


def _is_load_of(event: dict[str, Any], session: str, loader: str) -> bool:
    """Whether ``event`` is the ``load`` lifecycle event of that document in that attached session."""
    params = event.get("params", {})
    return (
        event.get("sessionId") == session
        and event.get("method") == "Page.lifecycleEvent"
        and params.get("name") == "load"
        and params.get("loaderId") == loader
    )


def _set_screen_size(display: str, width: int, height: int) -> None:
    from browservm.guest.screen_size import ScreenSizer

    try:
        sizer = ScreenSizer(display)
    except RuntimeError as exc:
        raise ServiceNotReady(str(exc)) from exc
    try:
        sizer.resize(width, height)
    finally:
        sizer.close()
