"""Per-user resources: the user's CLI VM and the credentials stored for them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.controller.errors import not_found
from browservm.controller.quotas import EventStream
from browservm.controller.services import Services
from browservm.store import credentials as credential_store
from browservm.store import egress as egress_store
from browservm.store.models import CliVm, EgressAssignment, Sandbox
from browservm_client.models import (
    EXEC_EVENTS,
    CliVmOut,
    CliVmOutput,
    CredentialOut,
    EgressOut,
    ExecRequest,
    ExecRunOut,
)

router = APIRouter(prefix="/v1/users/{user_id}", tags=["users"])
cli_vms_router = APIRouter(prefix="/v1/cli-vms", tags=["users"])

UserId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@+-]+$")]


def _cli_vm_out(services: Services, row: CliVm, sandbox: Sandbox) -> CliVmOut:
    return CliVmOut(
        user_id=row.user_id,
        sandbox_id=sandbox.id,
        state=services.cli_vms.state(sandbox),
        created_at=row.created_at,
    )


@cli_vms_router.get("", response_model=list[CliVmOut])
async def list_cli_vms(principal: PrincipalDep, services: ServicesDep) -> list[CliVmOut]:
    """Every CLI VM of this tenant."""
    return [_cli_vm_out(services, *found) for found in await services.cli_vms.all(principal.tenant)]


@router.post(
    "/cli-vm",
    status_code=201,
    response_model=CliVmOut,
)
async def create_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    """Create the user's persistent CLI sandbox; stored credentials are delivered into it at once."""
    return _cli_vm_out(services, *await services.cli_vms.create(principal.tenant, user_id))


@router.get("/cli-vm", response_model=CliVmOut)
async def get_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    return _cli_vm_out(services, *await services.cli_vms.describe(principal.tenant, user_id))


@router.get("/cli-vm/output", response_model=CliVmOutput)
async def get_cli_vm_output(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOutput:
    """What the last commands run in the user's CLI VM printed, newest first."""
    await services.cli_vms.describe(principal.tenant, user_id)
    runs = services.cli_vms.history.recent(principal.tenant, user_id)
    return CliVmOutput(
        user_id=user_id,
        runs=[
            ExecRunOut(
                exec_id=r.exec_id,
                argv=r.argv,
                started_at=r.started_at,
                ended_at=r.ended_at,
                exit_code=r.exit_code,
                timed_out=r.timed_out,
                output=r.output,
                truncated=r.truncated,
            )
            for r in runs
        ],
    )


@router.post("/cli-vm/hibernate", response_model=CliVmOut)
async def hibernate_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    """Stop its compute, keep its disk."""
    await services.cli_vms.hibernate(principal.tenant, user_id)
    return _cli_vm_out(services, *await services.cli_vms.require(principal.tenant, user_id))


@router.post("/cli-vm/resume", response_model=CliVmOut)
async def resume_cli_vm(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> CliVmOut:
    await services.cli_vms.resume(principal.tenant, user_id)
    return _cli_vm_out(services, *await services.cli_vms.require(principal.tenant, user_id))


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
    # An exec's output is an event stream like a session's: it counts against the same caps.
    slot = services.quotas.streams.take(principal.key_id)
    try:
        stream = await services.cli_vms.exec(
            principal.tenant, user_id, list(body.argv), dict(body.env), body.timeout_s
        )
    except BaseException:
        slot.release()
        raise

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for kind, data in stream:
            # Through the shared models: the stream has exactly the shape the client parses.
            yield ServerSentEvent(data=EXEC_EVENTS[kind].model_validate(data).model_dump_json(), event=kind)

    return EventStream(events(), slot)


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


async def _egress_out(services: Services, row: EgressAssignment) -> EgressOut:
    proxy, username = services.egress.describe(row)
    return EgressOut(
        user_id=row.user_id,
        pool=row.pool,
        proxy=proxy,
        port=row.port,
        username=username,
        generation=row.generation,
        status=row.status,
        exit_address=row.exit_address,
        detail=row.detail,
        checked_at=row.checked_at,
        created_at=row.created_at,
        rotated_at=row.rotated_at,
    )


@router.get("/egress", response_model=EgressOut)
async def get_egress(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> EgressOut:
    """The exit the user's sessions leave through (assigned now if they have none); never its password."""
    return await _egress_out(services, await services.egress.assignment(principal.tenant, user_id))


@router.post("/egress/rotate", response_model=EgressOut)
async def rotate_egress(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> EgressOut:
    """Move the user to another exit of their pool (or another pool); their next session uses it."""
    return await _egress_out(services, await services.egress.rotate(principal.tenant, user_id))


@router.post("/egress/check", response_model=EgressOut)
async def check_egress(user_id: UserId, principal: PrincipalDep, services: ServicesDep) -> EgressOut:
    """Check the user's exit through its proxy now (as the periodic check does) and answer what it saw."""
    assignment = await services.egress.assignment(principal.tenant, user_id)
    await services.egress.check(assignment)
    async with services.db.session() as db:
        fresh = await egress_store.get(db, tenant=principal.tenant, user_id=user_id)
    assert fresh is not None
    return await _egress_out(services, fresh)
