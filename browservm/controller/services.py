"""Everything the controller runs, built once at start-up from the settings and torn down at exit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from browservm.aio import cancel_and_wait
from browservm.controller.auth import load_secret
from browservm.controller.capacity import Capacity
from browservm.controller.cli_vms import CliVmService
from browservm.controller.metrics import Metrics
from browservm.controller.notifier import Notifier
from browservm.controller.pool import WarmPool
from browservm.controller.reconciler import Reconciler
from browservm.controller.sandboxes import SandboxService
from browservm.controller.sessions import SessionService
from browservm.controller.turn import Coturn
from browservm.sandbox import make_backend
from browservm.sandbox.base import SandboxBackend
from browservm.settings import Settings
from browservm.store.database import Database
from browservm.vault import Vault

log = structlog.get_logger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    backend: SandboxBackend
    secret: bytes
    vault: Vault
    metrics: Metrics
    notifier: Notifier
    capacity: Capacity
    sandboxes: SandboxService
    sessions: SessionService
    cli_vms: CliVmService
    reconciler: Reconciler
    pool: WarmPool
    coturn: Coturn | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls, settings: Settings, *, backend: SandboxBackend | None = None, metrics: Metrics | None = None
    ) -> Services:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.effective_database_url)
        await db.migrate()
        backend = backend or make_backend(settings)
        metrics = metrics or Metrics()
        notifier = Notifier()
        capacity = Capacity(settings.max_sandboxes, settings.max_queued_sessions, metrics)
        vault = Vault.from_settings(settings)
        sandboxes = SandboxService(
            backend, db, metrics, notifier, boot_timeout_s=settings.sandbox_boot_timeout_s
        )
        sessions = SessionService(settings, db, sandboxes, capacity, vault, metrics, notifier)
        cli_vms = CliVmService(db, sandboxes, capacity, vault, notifier)
        sessions.deliver = cli_vms.deliver
        pool = WarmPool(
            settings.effective_warm_pool_size,
            sandboxes,
            capacity,
            metrics,
            sessions.prepare_request,
            boot_timeout_s=settings.sandbox_boot_timeout_s,
        )
        sessions.pool = pool
        reconciler = Reconciler(
            db, sessions, sandboxes, capacity, metrics, pool, interval_s=settings.reconcile_interval_s
        )
        services = cls(
            settings=settings,
            db=db,
            backend=backend,
            secret=load_secret(settings.secret_key, settings.state_dir),
            vault=vault,
            metrics=metrics,
            notifier=notifier,
            capacity=capacity,
            sandboxes=sandboxes,
            sessions=sessions,
            cli_vms=cli_vms,
            reconciler=reconciler,
            pool=pool,
        )
        if settings.run_coturn:
            services.coturn = Coturn.from_settings(settings)
            await services.coturn.start()
            log.info("coturn.started", urls=services.coturn.urls)
        await reconciler.startup()
        services.background.append(asyncio.create_task(reconciler.run(), name="reconciler"))
        pool.start()  # after the start-up reconcile: adopted sandboxes count before the pool takes slots
        return services

    async def stop(self) -> None:
        await cancel_and_wait(self.background)
        await self.pool.close()
        await self.sessions.shutdown()
        await self.sandboxes.close()
        await self.backend.close()
        await self.db.close()
        if self.coturn is not None:
            await self.coturn.stop()
        log.info("controller.stopped")
