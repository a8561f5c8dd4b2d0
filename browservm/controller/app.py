"""The controller's ASGI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from browservm import __version__
from browservm.controller import errors
from browservm.controller.api import capacity, events, health, ice, sessions, signal, users, viewer, vnc, whep
from browservm.controller.metrics import LatencyMiddleware, Metrics
from browservm.controller.services import Services
from browservm.sandbox.base import SandboxBackend
from browservm.settings import Settings
from browservm.web import routes as web

log = structlog.get_logger(__name__)


def create_app(settings: Settings, *, backend: SandboxBackend | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(settings, backend=backend, metrics=metrics)
        app.state.services = services
        log.info("controller.started", url=settings.effective_public_url, backend=services.backend.name)
        try:
            yield
        finally:
            await services.stop()

    metrics = Metrics()
    app = FastAPI(
        title="browservm",
        version=__version__,
        summary="Disposable browsers in sandboxes, streamed over WebRTC, for signing CLI tools in",
        lifespan=lifespan,
    )
    errors.install(app)
    errors.document(app)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(viewer.router)
    app.include_router(events.router)
    app.include_router(capacity.router)
    app.include_router(users.router)
    app.include_router(users.cli_vms_router)
    app.include_router(ice.router)
    app.include_router(signal.router)
    app.include_router(whep.router)
    app.include_router(vnc.router)
    web.mount(app)
    # Middlewares wrap outside-in (the last added is outermost): the head and body limits refuse before
    # anything reads the body.
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(errors.RequestHead, limit=settings.http_max_header_bytes)
    return app
