"""The controller's ASGI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from browservm import __version__
from browservm.controller import errors
from browservm.controller.api import health, ice, sessions, signaling, users, vnc
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
    app.include_router(users.router)
    app.include_router(ice.router)
    app.include_router(signaling.router)
    app.include_router(vnc.router)
    web.mount(app)
    if settings.demo_oauth:
        # The local authorization server the demo provider signs in against (demos and tests).
        from browservm.demo.oauth import create_app as create_demo_oauth

        app.mount("/demo/oauth", create_demo_oauth(f"{settings.effective_public_url}/demo/oauth"))
    # Middlewares wrap outside-in: the body limit refuses before anything reads the body.
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    return app
