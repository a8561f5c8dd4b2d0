"""Liveness, readiness and metrics: unauthenticated by design (bind them to an internal port in production)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from browservm.controller.deps import ServicesDep
from browservm_client.models import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}}
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """The database answers and the sandbox backend can run sandboxes."""
    checks: dict[str, Any] = {}
    ready = True
    try:
        await services.db.ping()
        checks["database"] = "ok"
    except Exception as exc:
        ready = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    backend = await services.backend.readiness()
    checks["backend"] = backend.detail if backend.ready else f"not ready: {backend.detail}"
    ready = ready and backend.ready
    checks["capacity"] = {
        "limit": services.capacity.limit,
        "in_use": services.capacity.in_use,
        "queued": services.capacity.queued,
    }
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), 200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus exposition."""
    await services.reconciler.refresh_gauges()
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
