"""Per-user egress: each user's exit through an upstream proxy pool, sticky in the store until rotated,
checked through the proxy, and what a session's guest is given (docs/egress.md).

An *exit* is what a provider maps to one outgoing address: a port of a pool's range, or a ``{sticky}``
session id in its username. A user gets the least used exit of the least used pool the first time one
of their sessions (or ``GET /v1/users/{id}/egress``) needs it, and keeps it across sessions and
controller restarts; ``rotate`` moves them to another.

The check fetches ``egress_check_url`` through the proxy; its body is the address the far side saw (the
exit address). It runs for every assignment every ``egress_check_interval_s``, and at a session's start
when the last good check is older than ``egress_recheck_s`` (else a connect to the proxy only). A
session whose proxy fails it ends at once with the reason, or, with policy ``proxy-then-direct``, goes
direct (an event says so).

Passwords are read from the pool's file or variable when a check or a session needs them, and never
stored, logged or put in an event; the store holds the exit (pool, port, sticky id) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from browservm import protocol
from browservm.controller.errors import ApiError
from browservm.controller.metrics import Metrics
from browservm.sandbox.network import GuestEgress
from browservm.settings import ProxyPool, Settings, SettingsError
from browservm.store import egress as egress_store
from browservm.store.database import Database
from browservm.store.models import EgressAssignment

log = structlog.get_logger(__name__)

CHECKS_AT_ONCE = 8
NO_PROXY = ("localhost", "127.0.0.1", "::1")
"""What the guest reaches without its proxy: its own loopback (the CLI's sign-in callback)."""


class EgressUnavailable(Exception):
    """The user's proxy failed its check and the provider's policy does not allow going direct."""


@dataclass(frozen=True)
class Exit:
    """One user's exit as a session or a check uses it: where the proxy is and who to say we are."""

    pool: ProxyPool
    assignment_id: str
    generation: int
    host: str
    """What the controller connects to (the pool's host)."""
    guest_host: str
    """What the guest is told: the resolved address, or the name for an ``https`` pool."""
    address: ipaddress.IPv4Address
    port: int
    username: str | None
    password: str | None = field(repr=False)
    sticky: str = ""
    """The ``{sticky}`` id its username was made with (not a secret: the username shows it)."""

    @property
    def label(self) -> str:
        """Says which exit, never with a secret: ``pool resi, port 10003``."""
        return f"pool {self.pool.name}, port {self.port}"

    def url(self, *, host: str | None = None, credentials: bool = False) -> str:
        userinfo = ""
        if credentials and self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        return f"{self.pool.scheme}://{userinfo}{host or self.guest_host}:{self.port}"

    def scrub(self, text: str) -> str:
        """``text`` without the password (an error message that quoted the proxy URL)."""
        if self.password:
            text = text.replace(self.password, "***").replace(quote(self.password, safe=""), "***")
        return text


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    exit_address: str | None
    detail: str
    seconds: float


@dataclass(frozen=True)
class SessionEgress:
    """How one session's guest leaves the host."""

    mode: Literal["proxy", "direct"]
    exit: Exit | None = None
    note: str = ""
    """Why a session of a ``proxy-then-direct`` provider goes direct."""

    def guest(self) -> GuestEgress:
        """What the sandbox network gives the guest's link."""
        if self.mode == "direct":
            return GuestEgress("direct")
        if self.exit is None:
            return GuestEgress("none")
        by_name = self.exit.guest_host != str(self.exit.address)
        return GuestEgress("proxy", (self.exit.address, self.exit.port), dns=by_name)

    def proxy_config(self) -> protocol.ProxyConfig | None:
        """What the guest agent is told (browser context and CLI environment)."""
        if self.mode != "proxy" or self.exit is None:
            return None
        return protocol.ProxyConfig(
            url=self.exit.url(),
            username=self.exit.username,
            password=self.exit.password,
            bypass=list(NO_PROXY),
        )


class EgressService:
    def __init__(self, settings: Settings, db: Database, metrics: Metrics) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.pools = {pool.name: pool for pool in settings.egress_pools}
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)
        self.on_rotate: list[Callable[[str, str], Awaitable[None]]] = []
        """Called with (tenant, user id) after a rotation: the user's CLI VM is given its new exit."""

    @property
    def enabled(self) -> bool:
        return bool(self.pools)

    # ------------------------------------------------------------------ assignments

    async def assignment(self, tenant: str, user_id: str) -> EgressAssignment:
        """The user's exit, assigned now if they have none."""
        self._require_pools()
        for _attempt in range(3):
            async with self.db.session() as db:
                found = await egress_store.get(db, tenant=tenant, user_id=user_id)
                if found is not None and found.pool in self.pools:
                    return found
            try:
                async with self.db.session() as db:
                    pool, port, sticky = await self._least_used(db, exclude=None)
                    if found is not None:
                        # Its pool left the settings: the user moves to one that is there.
                        found = await egress_store.get(db, tenant=tenant, user_id=user_id)
                        assert found is not None
                        moved = await egress_store.move(db, found, pool=pool.name, port=port, sticky=sticky)
                        log.info("egress.reassigned", user_id=user_id, pool=pool.name, port=port)
                        return moved
                    created = await egress_store.add(
                        db, tenant=tenant, user_id=user_id, pool=pool.name, port=port, sticky=sticky
                    )
                log.info("egress.assigned", user_id=user_id, pool=pool.name, port=port)
                await self.report()
                return created
            except IntegrityError:
                continue  # another request assigned this user first: read theirs
        raise RuntimeError(f"could not assign an exit to user {user_id!r}")  # pragma: no cover

    async def rotate(self, tenant: str, user_id: str) -> EgressAssignment:
        """Move the user to another exit (the next session leaves through it; a running one keeps its)."""
        current = await self.assignment(tenant, user_id)
        async with self.db.session() as db:
            assignment = await egress_store.get(db, tenant=tenant, user_id=user_id)
            assert assignment is not None
            pool, port, sticky = await self._least_used(db, exclude=current)
            moved = await egress_store.move(db, assignment, pool=pool.name, port=port, sticky=sticky)
        log.info("egress.rotated", user_id=user_id, pool=pool.name, port=port, generation=moved.generation)
        await self.report()
        for hook in self.on_rotate:
            try:
                await hook(tenant, user_id)
            except Exception as exc:  # the rotation stands; a running CLI VM keeps its old exit
                log.warning("egress.rotate_hook_failed", user_id=user_id, error=str(exc))
        return moved

    async def _least_used(
        self, db: AsyncSession, *, exclude: EgressAssignment | None
    ) -> tuple[ProxyPool, int, str]:
        """The least used exit (pool, port, sticky id), other than ``exclude``'s."""
        users = await egress_store.users_per_pool(db)
        order = sorted(self.pools.values(), key=lambda p: users.get(p.name, 0))
        if exclude is not None:
            # Another exit of the same pool first (the operator chose it for the user), else another pool.
            same = self.pools.get(exclude.pool)
            others = [p for p in order if p.name != exclude.pool]
            order = ([same] if same is not None and self._exits(same) > 1 else []) + others
        for pool in order:
            sticky = secrets.token_hex(8) if pool.sticky else ""
            counts = await egress_store.ports_in_use(db, pool.name)
            ports = [
                port
                for port in pool.port_range
                if exclude is None or pool.sticky or not (pool.name == exclude.pool and port == exclude.port)
            ]
            if ports:
                return pool, min(ports, key=lambda port: (counts.get(port, 0), port)), sticky
        assert exclude is not None  # with nothing to leave out, every pool has a port
        raise ApiError(
            409,
            "no_other_exit",
            f"user {exclude.user_id!r} has the only exit there is (pool {exclude.pool}, port {exclude.port}): "
            "rotation needs a port range, a {sticky} username or another pool",
        )

    @staticmethod
    def _exits(pool: ProxyPool) -> int:
        return pool.exits if pool.exits is not None else 2**31

    def _require_pools(self) -> None:
        if not self.enabled:
            raise ApiError(
                409,
                "egress_off",
                "no egress proxy pool is configured (BROWSERVM_EGRESS_POOLS); guests go direct",
            )

    def describe(self, assignment: EgressAssignment) -> tuple[str, str | None]:
        """The proxy's URL (no credentials) and the rendered username: what the API shows."""
        pool = self.pools[assignment.pool]
        return f"{pool.scheme}://{pool.host}:{assignment.port}", self._username(pool, assignment)

    @staticmethod
    def _username(pool: ProxyPool, assignment: EgressAssignment) -> str | None:
        if pool.username is None:
            return None
        return pool.username.format(
            user=assignment.user_id, sticky=assignment.sticky, tenant=assignment.tenant, pool=pool.name
        )

    async def exit_of(self, assignment: EgressAssignment) -> Exit:
        """The assignment's exit, resolved and with its credentials (read now from the pool's secret)."""
        return await self._exit(
            self.pools[assignment.pool],
            assignment.port,
            assignment.sticky,
            tenant=assignment.tenant,
            user_id=assignment.user_id,
            assignment_id=assignment.id,
            generation=assignment.generation,
        )

    async def _exit(
        self,
        pool: ProxyPool,
        port: int,
        sticky: str,
        *,
        tenant: str,
        user_id: str,
        assignment_id: str,
        generation: int,
    ) -> Exit:
        address = await _resolve(pool.host)
        username = (
            None
            if pool.username is None
            else pool.username.format(user=user_id, sticky=sticky, tenant=tenant, pool=pool.name)
        )
        return Exit(
            pool=pool,
            assignment_id=assignment_id,
            generation=generation,
            host=pool.host,
            guest_host=pool.host if pool.scheme == "https" and not _is_address(pool.host) else str(address),
            address=address,
            port=port,
            username=username,
            password=pool.password(),
            sticky=sticky,
        )

    # ------------------------------------------------------------------ checks

    async def check(self, assignment: EgressAssignment) -> CheckResult:
        """Fetch the check URL through the user's proxy; record and count what happened."""
        async with self._checks:
            started = time.perf_counter()
            try:
                exit_ = await self.exit_of(assignment)
            except (OSError, SettingsError) as exc:
                result = CheckResult(False, None, f"cannot reach {assignment.pool}: {exc}", 0.0)
            else:
                result = await self._fetch_through(exit_, started)
        pool = assignment.pool
        self.metrics.egress_checks.labels(pool, "ok" if result.ok else "failed").inc()
        self.metrics.egress_check_seconds.labels(pool).observe(result.seconds)
        async with self.db.session() as db:
            await egress_store.record_check(
                db,
                assignment.id,
                ok=result.ok,
                exit_address=result.exit_address,
                detail=result.detail,
                at=datetime.now(UTC),
                generation=assignment.generation,
            )
        if result.ok:
            log.info("egress.check_ok", pool=pool, port=assignment.port, exit=result.exit_address)
        else:
            log.warning("egress.check_failed", pool=pool, port=assignment.port, detail=result.detail)
        await self.report()
        return result

    async def _fetch_through(self, exit_: Exit, started: float) -> CheckResult:
        timeout = self.settings.egress_check_timeout_s
        try:
            async with httpx.AsyncClient(
                proxy=exit_.url(host=exit_.host, credentials=True), timeout=timeout, trust_env=False
            ) as client:
                response = await client.get(self.settings.egress_check_url)
            seconds = time.perf_counter() - started
            if response.status_code == 407:
                return CheckResult(
                    False, None, f"{exit_.label}: the proxy refused its credentials (407)", seconds
                )
            if response.status_code != 200:
                return CheckResult(
                    False,
                    None,
                    f"{exit_.label}: the check URL answered {response.status_code} through it",
                    seconds,
                )
            seen = response.text.strip()
            if not _is_address(seen):
                return CheckResult(
                    False,
                    None,
                    f"{exit_.label}: the check URL's answer is not an address: {seen[:60]!r}",
                    seconds,
                )
            return CheckResult(True, seen, "", seconds)
        except (httpx.HTTPError, OSError) as exc:
            detail = (
                f"{exit_.label}: {type(exc).__name__}: {exc}"
                if str(exc)
                else f"{exit_.label}: {type(exc).__name__}"
            )
            return CheckResult(False, None, exit_.scrub(detail)[:500], time.perf_counter() - started)

    async def _connects(self, exit_: Exit) -> CheckResult:
        """Whether the proxy accepts a connection (a fresh check's cheap stand-in)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.egress_check_timeout_s):
                _reader, writer = await asyncio.open_connection(exit_.host, exit_.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            detail = f"{exit_.label}: cannot connect to the proxy: {exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
            return CheckResult(False, None, detail, time.perf_counter() - started)
        return CheckResult(True, None, "", time.perf_counter() - started)

    async def run(self) -> None:
        """Check every assignment, every ``egress_check_interval_s``."""
        while True:
            try:
                async with self.db.session() as db:
                    assignments = [a for a in await egress_store.all_assignments(db) if a.pool in self.pools]
                await asyncio.gather(*(self.check(a) for a in assignments))
            except Exception as exc:  # a database hiccup must not end the checks for good
                log.warning("egress.checks_failed", error=str(exc))
            await asyncio.sleep(self.settings.egress_check_interval_s)

    async def report(self) -> None:
        async with self.db.session() as db:
            assignments = await egress_store.all_assignments(db)
        counts: dict[tuple[str, str], int] = {}
        for a in assignments:
            counts[(a.pool, a.status)] = counts.get((a.pool, a.status), 0) + 1
        for name in self.pools:
            for status in ("unchecked", "ok", "bad"):
                self.metrics.egress_assignments.labels(name, status).set(counts.get((name, status), 0))

    # ------------------------------------------------------------------ sessions

    async def for_session(self, *, tenant: str, user_id: str, provider: str) -> SessionEgress | None:
        """How the session's guest leaves: ``None`` without pools (the network as before). Raises
        :class:`EgressUnavailable` when the user's proxy is down and the provider may not go direct."""
        if not self.enabled:
            return None
        policy = self.settings.egress_policy_for(provider)
        if policy == "direct":
            self.metrics.egress_sessions.labels("", "direct").inc()
            return SessionEgress("direct")
        assignment = await self.assignment(tenant, user_id)
        fresh = (
            assignment.status == "ok"
            and assignment.checked_at is not None
            and (datetime.now(UTC) - assignment.checked_at).total_seconds() < self.settings.egress_recheck_s
        )
        exit_: Exit | None = None
        try:
            exit_ = await self.exit_of(assignment)
        except (OSError, SettingsError) as exc:
            result = CheckResult(False, None, f"pool {assignment.pool}: {exc}", 0.0)
        else:
            result = await (self._connects(exit_) if fresh else self.check(assignment))
        if result.ok and exit_ is not None:
            self.metrics.egress_sessions.labels(assignment.pool, "proxy").inc()
            return SessionEgress("proxy", exit_)
        reason = f"the egress proxy is down ({result.detail})"
        if policy == "proxy-then-direct":
            self.metrics.egress_sessions.labels(assignment.pool, "fallback_direct").inc()
            return SessionEgress("direct", note=f"{reason}; going direct, as policy proxy-then-direct allows")
        self.metrics.egress_sessions.labels(assignment.pool, "failed").inc()
        raise EgressUnavailable(
            f"{reason}; the user's sessions of {provider} may leave only through it (policy proxy): fix the "
            f"proxy, or move the user to another exit (POST /v1/users/{user_id}/egress/rotate)"
        )

    async def for_cli_vm(self, *, tenant: str, user_id: str) -> SessionEgress | None:
        """How the user's CLI VM leaves: ``None`` without pools; else its user's exit (no check: a CLI VM
        does not fail with its proxy, its commands do), or ``direct`` as ``egress_cli_vm_policy`` says."""
        if not self.enabled:
            return None
        if self.settings.egress_cli_vm_policy == "direct":
            return SessionEgress("direct")
        assignment = await self.assignment(tenant, user_id)
        try:
            return SessionEgress("proxy", await self.exit_of(assignment))
        except (OSError, SettingsError) as exc:
            log.warning("egress.cli_vm_unresolved", user_id=user_id, error=str(exc))
            return SessionEgress("proxy")  # fails closed: nothing beyond TURN

    async def for_adopted(
        self, *, tenant: str, user_id: str, provider: str, recorded: Mapping[str, Any] | None = None
    ) -> SessionEgress | None:
        """A running session's egress again after a controller restart (no check: its browser already
        uses that proxy; the network's grant was forgotten with the old table).

        ``recorded`` is the session's ``session.egress`` event: the exit its browser was configured with,
        kept even if the user was rotated since (the browser's context cannot change proxy), and
        ``direct`` for a session that went direct. Without one (a session from before it was recorded),
        the user's current exit."""
        if not self.enabled:
            return None
        if recorded is not None and recorded.get("mode") == "direct":
            return SessionEgress("direct", note=str(recorded.get("note", "")))
        if recorded is None and self.settings.egress_policy_for(provider) == "direct":
            return SessionEgress("direct")
        assignment = await self.assignment(tenant, user_id)
        try:
            if recorded is None:
                return SessionEgress("proxy", await self.exit_of(assignment))
            pool = self.pools.get(str(recorded.get("pool")))
            port = int(recorded.get("port", 0))
            if pool is None or port not in pool.port_range:
                # Its pool (or that port) left the settings: the guest gets nothing beyond TURN.
                log.warning("egress.adopt_exit_gone", user_id=user_id, pool=recorded.get("pool"), port=port)
                return SessionEgress("proxy")
            exit_ = await self._exit(
                pool,
                port,
                str(recorded.get("sticky", "")),
                tenant=tenant,
                user_id=user_id,
                assignment_id=assignment.id,
                generation=int(recorded.get("generation", assignment.generation)),
            )
            return SessionEgress("proxy", exit_)
        except (OSError, SettingsError) as exc:
            # Its pool cannot be resolved now: the guest gets nothing beyond TURN (fails closed).
            log.warning("egress.adopt_unresolved", user_id=user_id, error=str(exc))
            return SessionEgress("proxy")


def proxy_environment(url: str, *, socks: bool = False) -> dict[str, str]:
    """The variables that send a program's requests through the proxy at ``url`` (the same set the
    guest agent gives the login CLI), its own loopback excepted."""
    bypass = ",".join(NO_PROXY)
    env = {name: url for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
    env.update(NO_PROXY=bypass, no_proxy=bypass, NODE_USE_ENV_PROXY="1")
    if socks:
        env.update(ALL_PROXY=url, all_proxy=url)
    return env


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def _resolve(host: str) -> ipaddress.IPv4Address:
    """The pool host's IPv4 address (guests have IPv4 only)."""
    with contextlib.suppress(ValueError):
        return ipaddress.IPv4Address(host)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, family=socket.AF_INET, type=socket.SOCK_STREAM
    )
    if not infos:
        raise OSError(f"{host} has no IPv4 address")
    return ipaddress.IPv4Address(infos[0][4][0])
