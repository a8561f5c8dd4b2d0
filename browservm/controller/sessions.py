"""The session flow: from ``pending`` to ``completed`` (or an ending with a reason), in the background.

One task per live session drives it::

    pending ─(capacity slot)─▶ starting ─(sandbox up, agent configured)─▶ awaiting_user
        ─(credentials complete)─▶ capturing ─(sealed, stored, delivered)─▶ completed

The task is restartable: after a controller restart it is launched again for every unfinished session
and picks up from the stored state, reconnecting to the sandbox if it still runs (the agent replays its
current state on connect). Whatever happens, the browser sandbox is destroyed when the session ends;
only a controller shutdown leaves it running, for the next start to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from pydantic import BaseModel

from browservm import protocol
from browservm.controller.capacity import Admission, Capacity, Lease
from browservm.controller.egress import EgressService, EgressUnavailable, SessionEgress
from browservm.controller.errors import ApiError, not_found
from browservm.controller.metrics import Metrics
from browservm.controller.notifier import Notifier
from browservm.controller.pool import WarmPool, WarmSandbox
from browservm.controller.sandboxes import SandboxService
from browservm.controller.turn import ice_servers
from browservm.sandbox.base import Liveness, SandboxError
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed
from browservm.settings import Settings
from browservm.store import credentials as credential_store
from browservm.store import events as event_store
from browservm.store import sessions as session_store
from browservm.store.database import Database
from browservm.store.models import Session
from browservm.store.states import IllegalTransition, SessionStatus
from browservm.vault import Vault

log = structlog.get_logger(__name__)

GUEST_EXPIRY_GRACE_S = 60.0
"""How long after its session's expiry a browser sandbox ends itself: time for this controller to end the
session (expired) and destroy the sandbox first."""


class SessionEnded(Exception):
    """The session reached an ending (its status is already written); the flow stops."""


@dataclass
class _Flow:
    """What one session's flow holds, given back by :meth:`SessionService._wind_up`."""

    admission: Admission | None
    """While the API's acceptance still counts against the queue."""
    lease: Lease | None
    """The slot of its browser sandbox, once it has one."""
    sandbox_id: str | None = None

    def admitted(self) -> None:
        """It holds a lease, or never will: it no longer counts as waiting."""
        if self.admission is not None:
            self.admission.withdraw()

    def keep_for_adoption(self) -> None:
        """The controller is stopping: the sandbox and its slot stay for the next start."""
        self.lease = None
        self.sandbox_id = None


class SessionService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        sandboxes: SandboxService,
        capacity: Capacity,
        vault: Vault,
        metrics: Metrics,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.db = db
        self.sandboxes = sandboxes
        self.capacity = capacity
        self.vault = vault
        self.metrics = metrics
        self.notifier = notifier
        self._flows: dict[str, asyncio.Task[None]] = {}
        """The task driving each session this controller runs, by session id."""
        self.session_channels: dict[str, Channel] = {}
        self.deliver: DeliveryHook | None = None
        self.pool: WarmPool | None = None
        self.guest_turn_urls: list[str] | None = None
        """Where guests reach TURN (the gateway's coturn); ``None``: the viewers' TURN URLs."""
        self.demo_issuer: str | None = None
        """The demo OAuth server as guests reach it."""
        self.egress: EgressService | None = None
        self._egress: dict[str, SessionEgress | None] = {}
        """Per live session, how its guest leaves (decided once, at its start)."""
        self._stopping = False

    # ------------------------------------------------------------------ API-facing

    async def create(self, *, tenant: str, user_id: str, provider: str, options: dict[str, Any]) -> Session:
        admission = self.capacity.admit()
        try:
            async with self.db.session() as db:
                session = await session_store.create(
                    db,
                    tenant=tenant,
                    user_id=user_id,
                    provider=provider,
                    expires_at=datetime.now(UTC) + timedelta(seconds=self.settings.session_ttl_s),
                    options=options,
                )
        except BaseException:
            admission.withdraw()
            raise
        self.launch(session.id, admission=admission)
        return session

    async def cancel(self, session_id: str, tenant: str) -> Session:
        async with self.db.session() as db:
            session = await session_store.get(db, session_id, tenant=tenant)
            if session is None:
                raise not_found("session", session_id)
            if SessionStatus(session.status).terminal:
                raise ApiError(409, "session_ended", f"session {session_id} already ended ({session.status})")
        try:
            session = await self._transition(session_id, SessionStatus.CANCELLED, "cancelled by the operator")
        except IllegalTransition as exc:
            raise ApiError(
                409,
                "not_cancellable",
                f"session {session_id} is {exc.current} and can no longer be cancelled",
            ) from None
        task = self._flows.get(session_id)
        if task is not None:
            task.cancel()
        return session

    async def channel(self, session_id: str) -> Channel:
        """The live channel of a session's browser sandbox (signaling, VNC bridge)."""
        channel = self.session_channels.get(session_id)
        if channel is None or channel.closed.is_set():
            raise ApiError(
                409, "no_sandbox", f"session {session_id} has no running browser (it is starting or ended)"
            )
        return channel

    # ------------------------------------------------------------------ lifecycle

    def launch(
        self, session_id: str, *, admission: Admission | None = None, lease: Lease | None = None
    ) -> None:
        """Drive the session: ``admission`` when the API just accepted it, ``lease`` when its sandbox is
        adopted after a restart (the slot it holds); the flow gives both up however it ends."""
        if session_id in self._flows:
            # Already driven, with its own lease: a second admission or lease would count it twice.
            if admission is not None:
                admission.withdraw()
            if lease is not None:
                lease.release()
            return
        task = asyncio.create_task(
            self._run(session_id, admission=admission, lease=lease), name=f"session-{session_id}"
        )
        self._flows[session_id] = task
        task.add_done_callback(lambda _t: self._flows.pop(session_id, None))

    def driving(self, session_id: str | None) -> bool:
        """Whether this controller runs the session's flow (which also ends its sandbox)."""
        return session_id in self._flows

    def stop_driving_except(self, unfinished: Collection[str]) -> int:
        """Stop the flows of sessions that ended elsewhere (the command line, another replica), those not
        in ``unfinished``; how many were stopped."""
        stopped = 0
        for session_id, task in list(self._flows.items()):
            if session_id not in unfinished and not task.cancelling():
                task.cancel()
                stopped += 1
        return stopped

    async def shutdown(self) -> None:
        """Stop driving sessions but leave their sandboxes running: the next start adopts them."""
        self._stopping = True
        tasks = list(self._flows.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, session_id: str, *, admission: Admission | None, lease: Lease | None) -> None:
        """One session's flow: the handler for the state it is found in brings its browser sandbox up (or
        back), then its events drive it to an ending; :meth:`_wind_up` cleans up after any ending."""
        structlog.contextvars.bind_contextvars(session_id=session_id)
        flow = _Flow(admission, lease)
        try:
            session = await self._load(session_id)
            if session is None or SessionStatus(session.status).terminal:
                return
            if session.status == SessionStatus.PENDING:
                session, channel = await self._from_pending(session, flow)
            else:
                channel = await self._from_adopted(session, flow)
            self.session_channels[session_id] = channel
            await self._follow(session, channel)
        except SessionEnded:
            pass
        except asyncio.CancelledError:
            if self._stopping:
                flow.keep_for_adoption()
                return
            raise
        except Exception as exc:
            log.exception("session.flow_error", error=str(exc))
            with contextlib.suppress(IllegalTransition, LookupError):
                await self._transition(session_id, SessionStatus.FAILED, _failure_reason(exc))
        finally:
            await self._wind_up(session_id, flow)
            structlog.contextvars.unbind_contextvars("session_id")

    async def _from_pending(self, session: Session, flow: _Flow) -> tuple[Session, Channel]:
        """A new session: its egress decided, a slot (a warm sandbox's, or one waited for in line), then
        ``starting`` and its sandbox configured. Returns the session as it now is."""
        # Before a sandbox or a slot is taken: a session whose proxy is down ends at once.
        self._egress[session.id] = await self._decide_egress(session)
        warm = None
        if self.pool is not None:
            warm = await self.pool.take(tenant=session.tenant, user_id=session.user_id, session_id=session.id)
        if warm is not None:
            flow.sandbox_id = warm.sandbox_id  # destroyed with the session from here on
            flow.lease = warm.lease
        else:
            flow.lease = await self.capacity.acquire(
                admission=flow.admission, key=session.id, on_position=functools.partial(self._queued, session)
            )
        flow.admitted()
        session = await self._transition(session.id, SessionStatus.STARTING)
        channel, flow.sandbox_id = await self._start_sandbox(session, warm)
        return session, channel

    async def _from_adopted(self, session: Session, flow: _Flow) -> Channel:
        """A session a previous controller drove (``starting`` or later): its sandbox, if it still runs,
        reconnected (its lease, if any, came from the reconciler)."""
        flow.sandbox_id = session.sandbox_id
        return await self._adopt(session)

    async def _wind_up(self, session_id: str, flow: _Flow) -> None:
        """After any ending: the sandbox destroyed and its slot released (unless the controller is stopping,
        when both stay for the next start to adopt)."""
        flow.admitted()
        self.session_channels.pop(session_id, None)
        self._egress.pop(session_id, None)
        try:
            sandbox_id = flow.sandbox_id
            if sandbox_id is None and not self._stopping:
                with contextlib.suppress(Exception):
                    sandbox_id = (await self._load(session_id) or Session()).sandbox_id
            if sandbox_id is not None and not self._stopping:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.sandboxes.destroy(sandbox_id, "session ended"))
        finally:
            # Released even if a second cancellation interrupts the clean-up above.
            if flow.lease is not None:
                flow.lease.release()

    async def _start_sandbox(self, session: Session, warm: WarmSandbox | None) -> tuple[Channel, str]:
        """The session's browser sandbox, configured: the warm one given (falling back to a new one if it
        turns out unusable) or a new one. The caller holds the capacity slot either way."""
        if warm is not None:
            async with self.db.session() as db:
                await session_store.update_fields(db, session.id, sandbox_id=warm.sandbox_id)
            try:
                await self._configure(session, warm.channel)
                log.info("session.warm_sandbox", sandbox_id=warm.sandbox_id)
                return warm.channel, warm.sandbox_id
            except (AgentError, ChannelClosed, protocol.ProtocolError, OSError) as exc:
                log.warning("session.warm_sandbox_unusable", sandbox_id=warm.sandbox_id, error=str(exc))
                await self.sandboxes.destroy(warm.sandbox_id, f"unusable warm sandbox: {exc}")
        try:
            handle, channel = await self.sandboxes.start(
                role="browser", tenant=session.tenant, user_id=session.user_id, session_id=session.id
            )
        except (SandboxError, ChannelClosed, protocol.ProtocolError, OSError) as exc:
            await self._end(
                session.id, SessionStatus.FAILED, f"browser sandbox did not start: {_failure_reason(exc)}"
            )
            raise SessionEnded from exc
        async with self.db.session() as db:
            await session_store.update_fields(db, session.id, sandbox_id=handle.sandbox_id)
        await self._configure(session, channel)
        return channel, handle.sandbox_id

    async def _decide_egress(self, session: Session) -> SessionEgress | None:
        if self.egress is None:
            return None
        try:
            egress = await self.egress.for_session(
                tenant=session.tenant, user_id=session.user_id, provider=session.provider
            )
        except EgressUnavailable as exc:
            await self._end(session.id, SessionStatus.FAILED, str(exc))
            raise SessionEnded from exc
        if egress is not None:
            await self._append(session, "session.egress", _egress_event(egress))
        return egress

    async def _recorded_egress(self, session: Session) -> dict[str, Any] | None:
        """What the session's ``session.egress`` event says its guest was given (adoption keeps it)."""
        async with self.db.session() as db:
            event = await event_store.latest(db, session.id, "session.egress")
        return None if event is None else dict(event.data or {})

    async def _egress_again(self, session: Session, egress: EgressService) -> SessionEgress | None:
        """An adopted session's egress as it was decided at its start, kept for the session's life."""
        again = await egress.for_adopted(
            tenant=session.tenant,
            user_id=session.user_id,
            provider=session.provider,
            recorded=await self._recorded_egress(session),
        )
        self._egress[session.id] = again
        return again

    async def _configure(self, session: Session, channel: Channel) -> None:
        remaining = (session.expires_at - datetime.now(UTC)).total_seconds()
        egress = self._egress.get(session.id)
        if egress is None and self.egress is not None and self.egress.enabled:
            # Adopted after a restart: how it left before (the network's grants were rebuilt empty).
            egress = await self._egress_again(session, self.egress)
        if egress is not None:
            # The grant comes first: the page opens through the proxy as soon as the agent has it.
            await self.sandboxes.set_egress(channel.sandbox_id, egress.guest())
        media = await self.sandboxes.media_of(channel.sandbox_id)
        await channel.request(
            protocol.Configure(
                session_id=session.id,
                provider=session.provider,
                provider_options=self._provider_options(session),
                screen=self._screen(),
                stream=self._stream(
                    ice_servers(
                        self.settings,
                        session.id,
                        session_expires_at=session.expires_at.timestamp(),
                        turn_urls=self.guest_turn_urls,
                    ),
                    media=protocol.MediaMapping(
                        public_ip=str(media.public_ip),
                        public_port=media.public_port,
                        guest_address=str(media.guest_address),
                        guest_port=media.guest_port,
                    )
                    if media is not None
                    else None,
                ),
                login_timeout_s=max(1.0, remaining),
                # The guest ends itself then, should this controller not be there to end it.
                expires_in_s=max(1.0, remaining) + GUEST_EXPIRY_GRACE_S,
                debug=self._debug(),
                proxy=egress.proxy_config() if egress is not None else None,
            ),
            timeout_s=60,
        )

    def prepare_request(self) -> protocol.Prepare:
        """What the warm pool prepares its sandboxes with: exactly what :meth:`_configure` will ask for."""
        return protocol.Prepare(screen=self._screen(), stream=self._stream([]), debug=self._debug())

    def _debug(self) -> protocol.Debug:
        return protocol.Debug(devtools_port=self.settings.devtools_debug_port)

    def _screen(self) -> protocol.ScreenConfig:
        settings = self.settings
        return protocol.ScreenConfig(
            width=settings.screen_width,
            height=settings.screen_height,
            fps=settings.screen_fps,
            max_width=settings.screen_max_width,
            max_height=settings.screen_max_height,
        )

    def _stream(
        self, servers: list[protocol.IceServer], media: protocol.MediaMapping | None = None
    ) -> protocol.StreamConfig:
        return protocol.StreamConfig(
            codec=self.settings.codec,
            host_addresses=self.settings.ice_host_addresses,
            ice_servers=servers,
            media=media,
        )

    async def _adopt(self, session: Session) -> Channel:
        if session.sandbox_id is None:
            await self._end(session.id, SessionStatus.FAILED, "controller restarted before a sandbox existed")
            raise SessionEnded
        record = await self.sandboxes.get(session.sandbox_id)
        if record is None or await self.sandboxes.probe(record) is not Liveness.ALIVE:
            if session.status == SessionStatus.CAPTURING:
                # The user had signed in: what was stored before the crash still completes the session.
                await self._capture(session, None, dict(session.account or {}))
            else:
                await self._end(
                    session.id, SessionStatus.FAILED, "browser sandbox was gone after a controller restart"
                )
            raise SessionEnded
        try:
            channel = await self.sandboxes.connect(self.sandboxes.handle_of(record))
        except (SandboxError, ChannelClosed, protocol.ProtocolError, OSError) as exc:
            await self._end(
                session.id, SessionStatus.FAILED, f"could not reconnect to the browser sandbox: {exc}"
            )
            raise SessionEnded from exc
        log.info("session.adopted", sandbox_id=record.id, status=session.status)
        if self.egress is not None and self.egress.enabled:
            egress = await self._egress_again(session, self.egress)
            if egress is not None:
                await self.sandboxes.set_egress(record.id, egress.guest())
        if session.status == SessionStatus.STARTING:
            # Killed between starting the sandbox and configuring it, the controller left an agent that
            # waits for its session: hand it over now rather than wait out the session's time.
            status = await channel.request(protocol.Status())
            if not status.configured:
                await self._configure(session, channel)
        return channel

    def _provider_options(self, session: Session) -> dict[str, str]:
        options = {str(k): str(v) for k, v in (session.options or {}).items()}
        if session.provider == "demo":
            options.setdefault(
                "issuer", self.demo_issuer or f"{self.settings.effective_public_url}/demo/oauth"
            )
        return options

    async def _follow(self, session: Session, channel: Channel) -> None:
        session_id = session.id
        async with channel.subscribe() as queue:
            # What the login reached before we listened (a restarted controller adopting the sandbox,
            # whose replay on connect came before this subscription): asked once, handled like an event.
            status = await channel.request(protocol.Status())
            if status.login is not None:
                session = await self._on_event(session, channel, status.login)
                if SessionStatus(session.status).terminal:
                    return
            while True:
                remaining = (session.expires_at - datetime.now(UTC)).total_seconds()
                if remaining <= 0:
                    await self._end(
                        session_id,
                        SessionStatus.EXPIRED,
                        f"not completed within {self.settings.session_ttl_s:.0f}s",
                    )
                    return
                try:
                    message = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    continue
                if message is None:
                    await self._end(session_id, SessionStatus.FAILED, "browser sandbox stopped unexpectedly")
                    return
                session = await self._on_event(session, channel, message)
                if SessionStatus(session.status).terminal:
                    return

    async def _on_event(self, session: Session, channel: Channel, message: BaseModel) -> Session:
        if isinstance(message, protocol.ServiceState):
            await self._append(session, "guest.service", message.model_dump(exclude={"type"}))
            return session
        if not isinstance(message, protocol.LoginState):
            return session
        status = SessionStatus(session.status)
        if message.state == "awaiting_user" and status is SessionStatus.STARTING:
            elapsed = (datetime.now(UTC) - session.created_at).total_seconds()
            self.metrics.time_to_ready.observe(elapsed)
            return await self._transition(session.id, SessionStatus.AWAITING_USER, login_url=message.url)
        if message.state == "credentials_ready" and status in (
            SessionStatus.STARTING,
            SessionStatus.AWAITING_USER,
            SessionStatus.CAPTURING,
        ):
            if status is not SessionStatus.CAPTURING:
                session = await self._transition(session.id, SessionStatus.CAPTURING, account=message.account)
            return await self._capture(session, channel, message.account)
        if message.state == "failed":
            return await self._end(session.id, SessionStatus.FAILED, f"login failed: {message.detail}")
        if message.state == "expired":
            return await self._end(session.id, SessionStatus.EXPIRED, message.detail or "login timed out")
        return session

    async def _capture(self, session: Session, channel: Channel | None, account: dict[str, str]) -> Session:
        """Seal, store and deliver the session's credentials, then complete it.

        Safe to run again after a crash at any point: a set already stored for the session is delivered
        and the session completed without asking the sandbox (which may be gone); otherwise the agent hands
        the files over again (they stay in the sandbox until it is destroyed, after this)."""
        async with self.db.session() as db:
            stored = await credential_store.for_session(db, session.id)
        if stored is not None:
            credential_id = stored.id
            files = decode_files(
                self.vault.open(
                    credential_store.sealed_of(stored), user_id=session.user_id, provider=session.provider
                )
            )
            log.info("session.capture_resumed", credential_id=credential_id)
        elif channel is None:
            return await self._end(
                session.id,
                SessionStatus.FAILED,
                "the browser sandbox was gone before the sign-in was stored; start a new session",
            )
        else:
            files = (await channel.request(protocol.CollectCredentials(), timeout_s=30)).files
            if not files:
                return await self._end(
                    session.id, SessionStatus.FAILED, "the login produced no credential files"
                )
            credential_id = await self._store(session, files, account)
        if self.deliver is not None:
            try:
                await self.deliver(session.tenant, session.user_id, credential_id, files, session.id)
            except Exception as exc:  # stored safely; delivery is retried when the CLI VM is next ready
                log.warning("session.delivery_failed", error=str(exc))
                await self._append(session, "credentials.delivery_failed", {"reason": str(exc)})
        del files
        started = session.created_at
        session = await self._transition(session.id, SessionStatus.COMPLETED)
        self.metrics.session_duration.labels("completed").observe(
            (datetime.now(UTC) - started).total_seconds()
        )
        return session

    async def _store(self, session: Session, files: list[protocol.FileBlob], account: dict[str, str]) -> str:
        plaintext = json.dumps([f.model_dump() for f in files]).encode()
        sealed = self.vault.seal(plaintext, user_id=session.user_id, provider=session.provider)
        del plaintext
        async with self.db.session() as db:
            credential = await credential_store.add(
                db,
                tenant=session.tenant,
                user_id=session.user_id,
                provider=session.provider,
                session_id=session.id,
                account=dict(account),
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
            )
            await event_store.append(
                db,
                kind="credentials.stored",
                session_id=session.id,
                tenant=session.tenant,
                data={"credential_id": credential.id, "provider": session.provider, "account": dict(account)},
            )
        self.notifier.notify(session.id)
        return credential.id

    # ------------------------------------------------------------------ store helpers

    async def _load(self, session_id: str) -> Session | None:
        async with self.db.session() as db:
            return await session_store.get(db, session_id)

    async def _transition(
        self, session_id: str, target: SessionStatus, reason: str = "", **fields: Any
    ) -> Session:
        async with self.db.session() as db:
            session = await session_store.transition(db, session_id, target, reason=reason, **fields)
        self.notifier.notify(session_id)
        return session

    async def expire(self, session_id: str, reason: str) -> Session:
        """End a session that is past its time and that no flow drives (the reconciler's case)."""
        return await self._end(session_id, SessionStatus.EXPIRED, reason)

    async def _end(self, session_id: str, target: SessionStatus, reason: str) -> Session:
        """Write an ending; a session that already ended keeps its first ending."""
        try:
            session = await self._transition(session_id, target, reason)
        except IllegalTransition:
            found = await self._load(session_id)
            assert found is not None
            return found
        self.metrics.session_duration.labels(target.value).observe(
            (datetime.now(UTC) - session.created_at).total_seconds()
        )
        return session

    async def _queued(self, session: Session, place: int) -> None:
        """The session's place in line for a slot, as an event its viewer and the operator follow."""
        await self._append(session, "session.queued", {"position": place})

    async def _append(self, session: Session, kind: str, data: dict[str, Any]) -> None:
        async with self.db.session() as db:
            await event_store.append(
                db,
                kind=kind,
                session_id=session.id,
                tenant=session.tenant,
                sandbox_id=session.sandbox_id,
                data=data,
            )
        self.notifier.notify(session.id)


class DeliveryHook(Protocol):
    """Delivers a fresh credential set into the user's CLI sandbox (see ``cli_vms``)."""

    async def __call__(
        self, tenant: str, user_id: str, credential_id: str, files: list[protocol.FileBlob], session_id: str
    ) -> None: ...


def _egress_event(egress: SessionEgress) -> dict[str, Any]:
    """What the session's events say of its egress: the exit, never a credential."""
    data: dict[str, Any] = {"mode": egress.mode}
    if egress.exit is not None:
        data.update(
            pool=egress.exit.pool.name,
            port=egress.exit.port,
            proxy=egress.exit.url(),
            generation=egress.exit.generation,
        )
        if egress.exit.sticky:
            data["sticky"] = egress.exit.sticky  # with the pool and port, what a restart grants again
    if egress.note:
        data["note"] = egress.note
    return data


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, SandboxError) and exc.detail:
        return f"{exc} | {exc.detail[-1000:]}"
    if isinstance(exc, AgentError):
        return f"guest agent refused: {exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def decode_files(plaintext: bytes) -> list[protocol.FileBlob]:
    return [protocol.FileBlob.model_validate(item) for item in json.loads(plaintext)]
