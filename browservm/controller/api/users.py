"""Per-user resources: the user's CLI VM and the credentials stored for them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.controller.errors import not_found
from browservm.store import credentials as credential_store
from browservm.store.models import CliVm, Sandbox

router = APIRouter(prefix="/v1/users/{user_id}", tags=["users"])

UserId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@+-]+$")]


class CliVmOut(BaseModel):
    user_id: str
    sandbox_id: str
    state: str
    created_at: datetime


class ExecRequest(BaseModel):
    argv: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=256)
    env: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )
    timeout_s: float = Field(60.0, gt=0, le=3600)


class CredentialOut(BaseModel):
    id: str
    provider: str
    account: dict[str, Any] = Field(
        description="Email, account id, plan: what the CLI recorded; never a secret"
    )
    session_id: str | None
    created_at: datetime
    validated_at: datetime | None
    expires_at: datetime | None
    delivered_at: datetime | None


def _cli_vm_out(row: CliVm, sandbox: Sandbox) -> CliVmOut:
    return CliVmOut(
        user_id=row.user_id, sandbox_id=sandbox.id, state=sandbox.state, created_at=row.created_at
    )


@router.post(
    "/cli-vm",
    status_code=201,
    response_model=CliVmOut,
)
async def create_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    """Create the user's persistent CLI sandbox; stored credentials are delivered into it at once."""
    return _cli_vm_out(*await services.cli_vms.create(principal.tenant, user_id))


@router.get("/cli-vm", response_model=CliVmOut)
async def get_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    return _cli_vm_out(*await services.cli_vms.require(principal.tenant, user_id))


@router.post("/cli-vm/hibernate", response_model=CliVmOut)
async def hibernate_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    """Stop its compute, keep its disk."""
    await services.cli_vms.hibernate(principal.tenant, user_id)
    return _cli_vm_out(*await services.cli_vms.require(principal.tenant, user_id))


@router.post("/cli-vm/resume", response_model=CliVmOut)
async def resume_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    await services.cli_vms.resume(principal.tenant, user_id)
    return _cli_vm_out(*await services.cli_vms.require(principal.tenant, user_id))


@router.delete("/cli-vm", status_code=204)
async def delete_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> Response:
    await services.cli_vms.delete(principal.tenant, user_id)
    return Response(status_code=204)


@router.post(
    "/cli-vm/exec",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "output, then exit"}},
)
async def exec_in_cli_vm(
    user_id: UserId, body: ExecRequest, principal: PrincipalDep, services: ServicesDep
) -> EventSourceResponse:
    """Run a command as the CLI user. Server-Sent Events: ``output`` {stream, data}…, then ``exit`` {exit_code}."""
    stream = await services.cli_vms.exec(
        principal.tenant, user_id, list(body.argv), dict(body.env), body.timeout_s
    )

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for kind, data in stream:
            yield ServerSentEvent(data=json.dumps(data), event=kind)

    return EventSourceResponse(events(), ping=15)


@router.get("/credentials", response_model=list[CredentialOut])
async def list_credentials(
    user_id: UserId, principal: PrincipalDep, services: ServicesDep
) -> list[CredentialOut]:
    """The user's live credential sets: what and whose, never the secrets."""
    async with services.db.session() as db:
        rows = await credential_store.for_user(db, tenant=principal.tenant, user_id=user_id)
    return [
        CredentialOut(
            id=r.id,
            provider=r.provider,
            account=r.account or {},
            session_id=r.session_id,
            created_at=r.created_at,
            validated_at=r.validated_at,
            expires_at=r.expires_at,
            delivered_at=r.delivered_at,
        )
        for r in rows
    ]


@router.delete("/credentials/{credential_id}", status_code=204)
async def revoke_credential(
    user_id: UserId,
    credential_id: Annotated[str, Path(max_length=40)],
    principal: PrincipalDep,
    services: ServicesDep,
) -> Response:
    """Forget a credential set: its sealed blob is erased (files already in the CLI VM stay there)."""
    async with services.db.session() as db:
        record = await credential_store.get(db, credential_id, tenant=principal.tenant)
        if record is None or record.user_id != user_id or record.revoked_at is not None:
            raise not_found("credential", credential_id)
        await credential_store.revoke(db, credential_id, tenant=principal.tenant)
    return Response(status_code=204)
