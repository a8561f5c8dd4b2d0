"""Each user's persistent CLI sandbox: created on request, kept across sessions, where credentials land.

Credentials are delivered through the sandbox's agent (``write_files``: atomic, mode 600, owned by the CLI
user), never by mounting its disk. A credential set sealed while the CLI sandbox was hibernated or did
not exist yet is delivered when it next comes up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from pydantic import BaseModel
from sqlalchemy import select

from browservm import protocol
from browservm.controller.capacity import Capacity
from browservm.controller.errors import ApiError
from browservm.controller.notifier import Notifier
from browservm.controller.sandboxes import SandboxService
from browservm.controller.sessions import decode_files
from browservm.sandbox.base import SandboxError
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed
from browservm.store import credentials as credential_store
from browservm.store import events as event_store
from browservm.store.database import Database
from browservm.store.models import CliVm, Sandbox
from browservm.store.states import SandboxState
from browservm.vault import Sealed, Vault

log = structlog.get_logger(__name__)


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
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, tenant: str, user_id: str) -> asyncio.Lock:
        return self._locks.setdefault((tenant, user_id), asyncio.Lock())

    async def find(self, tenant: str, user_id: str) -> tuple[CliVm, Sandbox] | None:
        async with self.db.session() as db:
            row = (
                await db.execute(select(CliVm).where(CliVm.tenant == tenant, CliVm.user_id == user_id))
            ).scalar_one_or_none()
            if row is None:
                return None
            sandbox = await db.get(Sandbox, row.sandbox_id, populate_existing=True)
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
            await self.capacity.take_now()
            try:
                handle, channel = await self.sandboxes.start(role="cli", tenant=tenant, user_id=user_id)
            except (SandboxError, ChannelClosed, protocol.ProtocolError, OSError) as exc:
                self.capacity.release()
                raise ApiError(502, "sandbox_failed", f"CLI VM did not start: {exc}") from exc
            async with self.db.session() as db:
                existing = (
                    await db.execute(select(CliVm).where(CliVm.tenant == tenant, CliVm.user_id == user_id))
                ).scalar_one_or_none()
                if existing is not None:
                    await db.delete(existing)
                    await db.flush()
                db.add(CliVm(tenant=tenant, user_id=user_id, sandbox_id=handle.sandbox_id))
            await self._deliver_pending(tenant, user_id, channel)
            return await self.require(tenant, user_id)

    async def delete(self, tenant: str, user_id: str) -> None:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.require(tenant, user_id)
            holds_slot = sandbox.state != SandboxState.HIBERNATED
            await self.sandboxes.destroy(sandbox.id, "deleted by the operator")
            if holds_slot:
                self.capacity.release()

    async def hibernate(self, tenant: str, user_id: str) -> Sandbox:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.require(tenant, user_id)
            if sandbox.state == SandboxState.HIBERNATED:
                raise ApiError(409, "already_hibernated", f"the CLI VM of {user_id!r} is already hibernated")
            await self.sandboxes.hibernate(sandbox)
            self.capacity.release()
            return (await self.require(tenant, user_id))[1]

    async def resume(self, tenant: str, user_id: str) -> Sandbox:
        async with self._lock(tenant, user_id):
            _row, sandbox = await self.require(tenant, user_id)
            if sandbox.state != SandboxState.HIBERNATED:
                raise ApiError(409, "not_hibernated", f"the CLI VM of {user_id!r} is running")
            await self.capacity.take_now()
            try:
                _handle, channel = await self.sandboxes.resume(sandbox)
            except (SandboxError, ChannelClosed, OSError) as exc:
                self.capacity.release()
                raise ApiError(502, "sandbox_failed", f"CLI VM did not resume: {exc}") from exc
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
        subscription = channel.subscribe()
        queue = await subscription.__aenter__()
        try:
            result = await channel.request(
                protocol.Exec(id=channel.next_id(), argv=argv, env=env, timeout_s=timeout_s)
            )
        except AgentError as exc:
            await subscription.__aexit__(None, None, None)
            raise ApiError(422, exc.code, exc.message) from None
        except (ChannelClosed, TimeoutError) as exc:
            await subscription.__aexit__(None, None, None)
            raise ApiError(502, "sandbox_unreachable", f"the CLI VM did not answer: {exc}") from None
        return self._exec_events(subscription, queue, str(result["exec_id"]))

    async def _exec_events(
        self,
        subscription: contextlib.AbstractAsyncContextManager[Any],
        queue: asyncio.Queue[BaseModel | None],
        exec_id: str,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        try:
            while True:
                message = await queue.get()
                if message is None:
                    yield "error", {"message": "the CLI VM's channel closed"}
                    return
                if isinstance(message, protocol.ExecOutput) and message.exec_id == exec_id:
                    data = base64.b64decode(message.data_b64).decode(errors="replace")
                    yield "output", {"stream": message.stream, "data": data}
                elif isinstance(message, protocol.ExecExit) and message.exec_id == exec_id:
                    yield "exit", {"exit_code": message.exit_code, "timed_out": message.timed_out}
                    return
        finally:
            await subscription.__aexit__(None, None, None)

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

    async def _deliver_pending(self, tenant: str, user_id: str, channel: Channel) -> None:
        async with self.db.session() as db:
            records = await credential_store.for_user(db, tenant=tenant, user_id=user_id)
        latest: dict[str, Any] = {}
        for record in records:  # newest first: one set per provider
            latest.setdefault(record.provider, record)
        for record in latest.values():
            plaintext = self.vault.open(
                Sealed(key_id=record.key_id, nonce=record.nonce, ciphertext=record.ciphertext),
                user_id=user_id,
                provider=record.provider,
            )
            await self._write(channel, tenant, record.id, decode_files(plaintext), record.session_id)

    async def _write(
        self,
        channel: Channel,
        tenant: str,
        credential_id: str,
        files: list[protocol.FileBlob],
        session_id: str | None,
    ) -> None:
        await channel.request(protocol.WriteFiles(id=channel.next_id(), files=files), timeout_s=30)
        async with self.db.session() as db:
            await credential_store.mark_delivered(db, credential_id)
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
