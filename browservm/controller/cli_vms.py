"""Each user's persistent CLI sandbox: created on request, kept across sessions, where credentials land.

Credentials are delivered through the sandbox's agent (``write_files``: atomic, mode 600, owned by the CLI
user), never by mounting its disk. A credential set sealed while the CLI sandbox was hibernated or did
not exist yet is delivered when it next comes up.

A CLI VM reports its own states (:class:`CliVmState`), not its sandbox's pool words: ``running`` while
it runs, ``hibernating``/``resuming``/``stopping`` while those operations run, ``hibernated``,
``starting`` and ``failed``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog

from browservm import protocol
from browservm.controller.capacity import Capacity, Lease
from browservm.controller.egress import EgressService, proxy_environment
from browservm.controller.errors import ApiError
from browservm.controller.exec_history import ExecHistory, ExecRun
from browservm.controller.notifier import Notifier
from browservm.controller.proxy_forwarder import ProxyForwarder
from browservm.controller.sandboxes import SandboxService
from browservm.controller.sessions import decode_files
from browservm.sandbox.base import SandboxError
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed, RemoteCommand
from browservm.sandbox.network import GuestEgress
from browservm.store import cli_vms as cli_vm_store
from browservm.store import credentials as credential_store
from browservm.store import events as event_store
from browservm.store import sandboxes as sandbox_store
from browservm.store.database import Database
from browservm.store.models import CliVm, Credential, Sandbox
from browservm.store.states import SandboxState
from browservm.vault import Vault
from browservm_client.models import CliVmState

log = structlog.get_logger(__name__)


_FROM_SANDBOX = {
    SandboxState.CREATING: CliVmState.STARTING,
    SandboxState.READY: CliVmState.STARTING,
    SandboxState.ASSIGNED: CliVmState.RUNNING,
    SandboxState.HIBERNATED: CliVmState.HIBERNATED,
    SandboxState.DESTROYING: CliVmState.STOPPING,
    SandboxState.DESTROYED: CliVmState.STOPPING,
    SandboxState.FAILED: CliVmState.FAILED,
}


class CliVmService:
    def __init__(
        self,
        db: Database,
        sandboxes: SandboxService,
        capacity: Capacity,
        vault: Vault,
        notifier: Notifier,
    ) -> None:
        self.db = db
        self.sandboxes = sandboxes
        self.capacity = capacity
        self.vault = vault
        self.notifier = notifier
        self.history = ExecHistory()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._busy: dict[tuple[str, str], CliVmState] = {}
        """The operation under way on a user's CLI VM (hibernating, resuming, stopping)."""
        self.egress: EgressService | None = None
        """With proxy pools: each CLI VM leaves through its user's exit (docs/egress.md)."""
        self.forwarder: ProxyForwarder | None = None
        self._proxy_env: dict[str, dict[str, str]] = {}
        """By sandbox id: what each exec in the CLI VM gets in its environment (no credential in it)."""
        self._leases: dict[str, Lease] = {}
        """By sandbox id: the slot of each running CLI VM (none while hibernated)."""

    def hold(self, sandbox_id: str, lease: Lease) -> None:
        """The slot of a running CLI VM adopted after a restart."""
        self._leases[sandbox_id] = lease

    def _let_go(self, sandbox_id: str) -> None:
        """The CLI VM no longer runs: its slot is free for others."""
        lease = self._leases.pop(sandbox_id, None)
        if lease is not None:
            lease.release()

    def _lock(self, tenant: str, user_id: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, user_id), asyncio.Lock())

    def state(self, sandbox: Sandbox) -> CliVmState:
        """The CLI VM's own state: the operation under way, else what its sandbox's state means for it."""
        busy = self._busy.get((sandbox.tenant or "", sandbox.user_id or ""))
        return busy or _FROM_SANDBOX.get(SandboxState(sandbox.state), CliVmState.FAILED)

    @contextlib.contextmanager
    def _doing(self, tenant: str, user_id: str, state: CliVmState, sandbox_id: str) -> Iterator[None]:
        self._busy[(tenant, user_id)] = state
        self.notifier.notify(sandbox_id)
        try:
            yield
        finally:
            self._busy.pop((tenant, user_id), None)
            self.notifier.notify(sandbox_id)

    async def all(self, tenant: str) -> list[tuple[CliVm, Sandbox]]:
        """The tenant's CLI VMs that exist (failed ones included, until replaced or deleted)."""
        async with self.db.session() as db:
            found = []
            for row in await cli_vm_store.of_tenant(db, tenant):
                sandbox = await cli_vm_store.sandbox_of(db, row)
                if sandbox is not None and sandbox.state != SandboxState.DESTROYED:
                    found.append((row, sandbox))
        return found

    async def describe(self, tenant: str, user_id: str) -> tuple[CliVm, Sandbox]:
        """The user's CLI VM as ``GET`` shows it: a failed one too, so its state says so."""
        for row, sandbox in await self.all(tenant):
            if row.user_id == user_id:
                return row, sandbox
        raise ApiError(
            404, "cli_vm_not_found", f"user {user_id!r} has no CLI VM; create one with POST …/cli-vm"
        )

    async def find(self, tenant: str, user_id: str) -> tuple[CliVm, Sandbox] | None:
        async with self.db.session() as db:
            row = await cli_vm_store.of_user(db, tenant=tenant, user_id=user_id)
            if row is None:
                return None
            sandbox = await cli_vm_store.sandbox_of(db, row)
        if sandbox is None or sandbox.state in (SandboxState.DESTROYED, SandboxState.FAILED):
            return None
        return row, sandbox

    async def require(self, tenant: str, user_id: str) -> tuple[CliVm, Sandbox]:
        found = await self.find(tenant, user_id)
        if found is None:
            raise ApiError(
                404, "cli_vm_not_found", f"user {user_id!r} has no CLI VM; create one with POST …/cli-vm"
            )
        return found

    async def create(self, tenant: str, user_id: str) -> tuple[CliVm, Sandbox]:
        async with self._lock(tenant, user_id):
            if await self.find(tenant, user_id) is not None:
                raise ApiError(409, "cli_vm_exists", f"user {user_id!r} already has a CLI VM")
            lease = await self.capacity.take_now()
            try:
                handle, channel = await self.sandboxes.start(role="cli", tenant=tenant, user_id=user_id)
            except BaseException as exc:
                lease.release()
                if isinstance(exc, SandboxError | ChannelClosed | protocol.ProtocolError | OSError):
                    raise ApiError(502, "sandbox_failed", f"CLI VM did not start: {exc}") from exc
                raise
            self._leases[handle.sandbox_id] = lease
            async with self.db.session() as db:
                await cli_vm_store.put(db, tenant=tenant, user_id=user_id, sandbox_id=handle.sandbox_id)
            self.history.forget(tenant, user_id)  # a new VM starts with no past
            self.notifier.notify(handle.sandbox_id)
            await self.grant(tenant, user_id, handle.sandbox_id)
            await self._deliver_pending(tenant, user_id, channel)
            return await self.require(tenant, user_id)

    async def delete(self, tenant: str, user_id: str) -> None:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.describe(tenant, user_id)
            with self._doing(tenant, user_id, CliVmState.STOPPING, sandbox.id):
                if sandbox.state == SandboxState.ASSIGNED:
                    await self._read_back_quietly(tenant, user_id, sandbox)
                await self.sandboxes.destroy(sandbox.id, "deleted by the operator")
                await self._ungrant(sandbox.id)
            self._let_go(sandbox.id)
            self.history.forget(tenant, user_id)

    async def hibernate(self, tenant: str, user_id: str) -> Sandbox:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.require(tenant, user_id)
            if sandbox.state == SandboxState.HIBERNATED:
                raise ApiError(409, "already_hibernated", f"the CLI VM of {user_id!r} is already hibernated")
            with self._doing(tenant, user_id, CliVmState.HIBERNATING, sandbox.id):
                await self._read_back_quietly(tenant, user_id, sandbox)
                await self.sandboxes.hibernate(sandbox)
                await self._ungrant(sandbox.id)
            self._let_go(sandbox.id)
            return (await self.require(tenant, user_id))[1]

    async def resume(self, tenant: str, user_id: str) -> Sandbox:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.require(tenant, user_id)
            if sandbox.state != SandboxState.HIBERNATED:
                raise ApiError(409, "not_hibernated", f"the CLI VM of {user_id!r} is running")
            lease = await self.capacity.take_now()
            with self._doing(tenant, user_id, CliVmState.RESUMING, sandbox.id):
                try:
                    _handle, channel = await self.sandboxes.resume(sandbox)
                except BaseException as exc:
                    lease.release()
                    if isinstance(exc, SandboxError | ChannelClosed | OSError):
                        raise ApiError(502, "sandbox_failed", f"CLI VM did not resume: {exc}") from exc
                    raise
                self._leases[sandbox.id] = lease
                await self.grant(tenant, user_id, sandbox.id)
                await self._deliver_pending(tenant, user_id, channel)
            return (await self.require(tenant, user_id))[1]

    async def channel(self, tenant: str, user_id: str) -> Channel:
        _row, sandbox = await self.require(tenant, user_id)
        if sandbox.state == SandboxState.HIBERNATED:
            raise ApiError(409, "hibernated", f"the CLI VM of {user_id!r} is hibernated; resume it first")
        try:
            return await self.sandboxes.connect(self.sandboxes.handle_of(sandbox))
        except (SandboxError, ChannelClosed, protocol.ProtocolError, OSError) as exc:
            raise ApiError(502, "sandbox_unreachable", f"cannot reach the CLI VM: {exc}") from exc

    async def exec(
        self, tenant: str, user_id: str, argv: list[str], env: dict[str, str], timeout_s: float
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Start a command in the CLI VM, then stream it: ``("output", …)`` chunks and one ``("exit", …)``.

        Starting happens before this returns, so a refused command is a 4xx, not a broken stream.
        """
        channel = await self.channel(tenant, user_id)
        proxy = self._proxy_env.get(channel.sandbox_id)
        if proxy is None:
            proxy = await self.grant(tenant, user_id, channel.sandbox_id)
        # The proxy's variables win over the caller's: the network holds the VM to its proxy anyway.
        env = {**env, **proxy}
        try:
            command = await channel.exec(protocol.Exec(argv=argv, env=env, timeout_s=timeout_s))
        except AgentError as exc:
            raise ApiError(422, exc.code, exc.message) from None
        except (ChannelClosed, TimeoutError) as exc:
            raise ApiError(502, "sandbox_unreachable", f"the CLI VM did not answer: {exc}") from None
        run = self.history.start(tenant, user_id, command.exec_id, argv)
        return self._exec_events(command, run)

    async def _exec_events(
        self, command: RemoteCommand, run: ExecRun
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            async for message in command:
                if isinstance(message, protocol.ExecOutput):
                    data = base64.b64decode(message.data_b64).decode(errors="replace")
                    run.add(data)
                    yield "output", {"stream": message.stream, "data": data}
                else:
                    run.finish(message.exit_code, message.timed_out)
                    yield "exit", {"exit_code": message.exit_code, "timed_out": message.timed_out}
        except ChannelClosed:
            yield "error", {"message": "the CLI VM's channel closed"}
        except protocol.ProtocolError as exc:
            yield "error", {"message": f"the CLI VM's agent broke the protocol: {exc}"}
        finally:
            await command.close()

    # ------------------------------------------------------------------ egress

    async def grant(self, tenant: str, user_id: str, sandbox_id: str) -> dict[str, str]:
        """Give the CLI VM its user's egress on the network, and remember what its commands are told.

        An exit with credentials is reached through the VM's forwarder on the gateway (the VM never
        holds the pool's password); one without (a socks5 pool, or a pool that authorizes by address)
        is granted to the VM as it is, like a browser session's."""
        egress = None
        if self.egress is not None:
            egress = await self.egress.for_cli_vm(tenant=tenant, user_id=user_id)
        env: dict[str, str] = {}
        if egress is None:
            guest = GuestEgress("direct")  # without pools the network is not per guest: this is a no-op
        elif egress.mode == "direct":
            guest = GuestEgress("direct")
        elif egress.exit is None:
            guest = GuestEgress("none")
        elif egress.exit.username is not None and self.forwarder is not None:
            port = await self.forwarder.ensure(sandbox_id, egress.exit)
            guest = GuestEgress("proxy", (self.forwarder.listen, port))
            env = proxy_environment(f"http://{self.forwarder.listen}:{port}")
        else:
            guest = egress.guest()
            env = proxy_environment(egress.exit.url(), socks=egress.exit.pool.scheme == "socks5")
        await self.sandboxes.set_egress(sandbox_id, guest)
        self._proxy_env[sandbox_id] = env
        if egress is not None:
            log.info(
                "cli_vm.egress",
                sandbox_id=sandbox_id,
                mode=guest.mode,
                exit=egress.exit.label if egress.exit is not None else None,
            )
        return env

    async def regrant(self, tenant: str, user_id: str) -> None:
        """After a rotation: the user's running CLI VM leaves through the new exit from its next
        connection (a tunnel already open keeps the old one until it closes); a hibernated one is
        granted it when resumed."""
        found = await self.find(tenant, user_id)
        if found is not None and found[1].state == SandboxState.ASSIGNED:
            await self.grant(tenant, user_id, found[1].id)

    async def restore_egress(self) -> None:
        """Give running CLI VMs their egress again (a controller's start rebuilt the network's table)."""
        async with self.db.session() as db:
            running = [
                record
                for record in await sandbox_store.live(db)
                if record.role == "cli" and record.state == SandboxState.ASSIGNED
            ]
        for record in running:
            try:
                await self.grant(record.tenant or "", record.user_id or "", record.id)
            except Exception as exc:  # that VM stays without a grant (fails closed); its next exec retries
                log.warning("cli_vm.egress_restore_failed", sandbox_id=record.id, error=str(exc))

    async def _ungrant(self, sandbox_id: str) -> None:
        self._proxy_env.pop(sandbox_id, None)
        if self.forwarder is not None:
            await self.forwarder.close(sandbox_id)

    async def close(self) -> None:
        """The controller stops: the forwarders end (a restarted one starts them again)."""
        self._proxy_env.clear()
        if self.forwarder is not None:
            await self.forwarder.close_all()

    # ------------------------------------------------------------------ delivery

    async def deliver(
        self, tenant: str, user_id: str, credential_id: str, files: list[protocol.FileBlob], session_id: str
    ) -> None:
        """The session flow's hook: write a fresh credential set into the user's CLI VM if it runs."""
        found = await self.find(tenant, user_id)
        if found is None or found[1].state != SandboxState.ASSIGNED:
            log.info("cli_vm.delivery_deferred", user_id=user_id, credential_id=credential_id)
            return
        channel = await self.channel(tenant, user_id)
        await self._write(channel, tenant, credential_id, files, session_id)

    async def _latest(self, tenant: str, user_id: str) -> list[Credential]:
        """The user's live set of each provider (a new sign-in revokes the older ones)."""
        async with self.db.session() as db:
            records = await credential_store.for_user(db, tenant=tenant, user_id=user_id)
        latest: dict[str, Credential] = {}
        for record in records:  # newest first
            latest.setdefault(record.provider, record)
        return list(latest.values())

    def _files_of(self, record: Credential, user_id: str) -> list[protocol.FileBlob]:
        plaintext = self.vault.open(
            credential_store.sealed_of(record), user_id=user_id, provider=record.provider
        )
        return decode_files(plaintext)

    async def _deliver_pending(self, tenant: str, user_id: str, channel: Channel) -> None:
        """Write each provider's live set this VM does not have yet. A set already written into it is
        left alone: the user's CLI may have refreshed its tokens since (refresh tokens are single use),
        so the VM's copy is the newer one; only a new sign-in replaces it."""
        for record in await self._latest(tenant, user_id):
            if record.delivered_sandbox_id == channel.sandbox_id:
                continue
            await self._write(channel, tenant, record.id, self._files_of(record, user_id), record.session_id)

    async def _read_back_quietly(self, tenant: str, user_id: str, sandbox: Sandbox) -> None:
        try:
            channel = await self.sandboxes.connect(self.sandboxes.handle_of(sandbox))
            await self._read_back(tenant, user_id, channel)
        except Exception as exc:  # the vault keeps what it had; the VM's files stay on its disk
            log.warning("cli_vm.read_back_failed", user_id=user_id, error=str(exc))

    async def _read_back(self, tenant: str, user_id: str, channel: Channel) -> None:
        """Keep the vault in step with the VM: credential files its tools rewrote (a refreshed token) are
        sealed as the provider's new live set, which is what a VM created later gets."""
        for record in await self._latest(tenant, user_id):
            if record.delivered_sandbox_id != channel.sandbox_id:
                continue
            delivered = self._files_of(record, user_id)
            own = [
                f.path for f in delivered if f.merge == "replace"
            ]  # merged files hold the user's settings too
            current = {f.path: f for f in (await channel.request(protocol.ReadFiles(paths=own))).files}
            changed = [
                f for f in delivered if f.path in current and current[f.path].content_b64 != f.content_b64
            ]
            if not changed:
                continue
            files = [current[f.path] if f in changed else f for f in delivered]
            plaintext = json.dumps([f.model_dump() for f in files]).encode()
            sealed = self.vault.seal(plaintext, user_id=user_id, provider=record.provider)
            del plaintext
            async with self.db.session() as db:
                refreshed = await credential_store.add(
                    db,
                    tenant=tenant,
                    user_id=user_id,
                    provider=record.provider,
                    session_id=record.session_id,
                    account=dict(record.account or {}),
                    key_id=sealed.key_id,
                    nonce=sealed.nonce,
                    ciphertext=sealed.ciphertext,
                )
                await credential_store.mark_delivered(db, refreshed.id, channel.sandbox_id)
                await event_store.append(
                    db,
                    kind="credentials.refreshed",
                    sandbox_id=channel.sandbox_id,
                    tenant=tenant,
                    data={
                        "credential_id": refreshed.id,
                        "replaces": record.id,
                        "provider": record.provider,
                        "files": [f.path for f in changed],
                    },
                )
            log.info("cli_vm.credentials_read_back", provider=record.provider, files=len(changed))

    async def _write(
        self,
        channel: Channel,
        tenant: str,
        credential_id: str,
        files: list[protocol.FileBlob],
        session_id: str | None,
    ) -> None:
        await channel.request(protocol.WriteFiles(files=files), timeout_s=30)
        async with self.db.session() as db:
            await credential_store.mark_delivered(db, credential_id, channel.sandbox_id)
            await event_store.append(
                db,
                kind="credentials.delivered",
                session_id=session_id,
                sandbox_id=channel.sandbox_id,
                tenant=tenant,
                data={"credential_id": credential_id, "files": [f.path for f in files]},
            )
        if session_id:
            self.notifier.notify(session_id)
        log.info("cli_vm.delivered", credential_id=credential_id, files=len(files))
