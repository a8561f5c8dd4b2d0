"""Everything the controller runs, built once at start-up from the settings and torn down at exit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from browservm.aio import cancel_and_wait
from browservm.controller.auth import KeyUse, load_secret
from browservm.controller.capacity import Capacity
from browservm.controller.cli_vms import CliVmService
from browservm.controller.egress import EgressService
from browservm.controller.metrics import Metrics
from browservm.controller.notifier import Notifier
from browservm.controller.pool import WarmPool
from browservm.controller.proxy_forwarder import ProxyForwarder
from browservm.controller.quotas import Quotas
from browservm.controller.reconciler import Reconciler
from browservm.controller.sandboxes import SandboxService
from browservm.controller.sessions import SessionService
from browservm.controller.turn import Coturn, coturn_port, guest_turn_urls
from browservm.controller.viewers import LocalViewers, ViewerRegistry
from browservm.demo.server import DemoOAuthServer
from browservm.sandbox import make_backend, resources_by_role, scope_of
from browservm.sandbox.base import SandboxBackend
from browservm.sandbox.image import guest_image
from browservm.sandbox.network import HostService, MediaNat, NetworkConfig, SandboxNetwork, parse_dns
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
    quotas: Quotas
    egress: EgressService
    coturn: Coturn | None = None
    demo_oauth: DemoOAuthServer | None = None
    key_use: KeyUse = field(default_factory=KeyUse)
    viewers: ViewerRegistry = field(default_factory=LocalViewers)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls, settings: Settings, *, backend: SandboxBackend | None = None, metrics: Metrics | None = None
    ) -> Services:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.effective_database_url)
        await db.migrate()
        backend = backend or make_backend(settings)
        network = SandboxNetwork(network_config(settings))
        await network.ensure_host()
        metrics = metrics or Metrics()
        notifier = Notifier()
        capacity = Capacity(settings.max_sandboxes, settings.max_queued_sessions, metrics)
        vault = Vault.from_settings(settings)
        sandboxes = SandboxService(
            backend,
            db,
            metrics,
            notifier,
            boot_timeout_s=settings.sandbox_boot_timeout_s,
            resources=resources_by_role(settings),
            network=network,
            image=lambda: guest_image(settings),
        )
        egress = EgressService(settings, db, metrics)
        sessions = SessionService(settings, db, sandboxes, capacity, vault, metrics, notifier)
        sessions.egress = egress
        gateway = str(network.config.gateway)
        sessions.guest_turn_urls = guest_turn_urls(settings, gateway)
        cli_vms = CliVmService(db, sandboxes, capacity, vault, notifier)
        if egress.enabled:
            cli_vms.egress = egress
            cli_vms.forwarder = ProxyForwarder(
                network.config.gateway, connect_timeout_s=settings.egress_check_timeout_s
            )
            egress.on_rotate.append(cli_vms.regrant)
        sessions.deliver = cli_vms.deliver
        pool = WarmPool(
            settings.effective_warm_pool_size,
            sandboxes,
            capacity,
            metrics,
            sessions.prepare_request,
            boot_timeout_s=settings.sandbox_boot_timeout_s,
            snapshots=settings.warm_pool_snapshots,
        )
        sessions.pool = pool
        reconciler = Reconciler(
            db,
            sessions,
            sandboxes,
            cli_vms,
            capacity,
            metrics,
            pool,
            interval_s=settings.reconcile_interval_s,
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
            quotas=Quotas.from_settings(settings),
            egress=egress,
        )
        if settings.run_coturn:
            # Relaying from the gateway: a relayed packet to a guest then leaves from an address the
            # guest's link routes (from 127.0.0.1 it would be dropped as a martian).
            services.coturn = Coturn.from_settings(settings, extra_listening_ips=[gateway], relay_ip=gateway)
            await services.coturn.start()
            log.info("coturn.started", urls=services.coturn.urls)
        if settings.demo_oauth:
            services.demo_oauth = DemoOAuthServer(
                hosts=["127.0.0.1", gateway], port=settings.demo_oauth_port, issuer_host=gateway
            )
            await services.demo_oauth.start()
            sessions.demo_issuer = services.demo_oauth.issuer
        await reconciler.startup()
        await cli_vms.restore_egress()  # the rebuilt table forgot what CLI VMs may reach
        await sandboxes.restore_media()  # and the live browser sandboxes' media mappings
        services.background.append(asyncio.create_task(reconciler.run(), name="reconciler"))
        if egress.enabled:
            await egress.report()
            services.background.append(asyncio.create_task(egress.run(), name="egress-checks"))
        services.background.append(asyncio.create_task(notifier.watch(db), name="event-watcher"))
        pool.start()  # after the start-up reconcile: adopted sandboxes count before the pool takes slots
        return services

    async def stop(self) -> None:
        await cancel_and_wait(self.background)
        await self.pool.close()
        await self.sessions.shutdown()
        await self.cli_vms.close()
        await self.sandboxes.close()
        await self.backend.close()
        await self.db.close()
        if self.coturn is not None:
            await self.coturn.stop()
        if self.demo_oauth is not None:
            await self.demo_oauth.stop()
        log.info("controller.stopped")


def network_config(settings: Settings) -> NetworkConfig:
    """The sandbox network of this controller: its subnet, egress, DNS, and the host services guests
    may reach on the gateway (the local coturn, the demo OAuth server)."""
    services: list[HostService] = []
    gateway = settings.sandbox_subnet.network_address + 1
    if settings.run_coturn:
        port = coturn_port(settings)
        services += [HostService("udp", port, every_guest=True), HostService("tcp", port, every_guest=True)]
    for url in settings.guest_turn_urls:
        host, _, port_text = url.split(":", 1)[1].split("?", 1)[0].rpartition(":")
        if host == str(gateway) and port_text.isdigit():
            services += [
                HostService("udp", int(port_text), every_guest=True),
                HostService("tcp", int(port_text), every_guest=True),
            ]
    if settings.demo_oauth:
        services.append(HostService("tcp", settings.demo_oauth_port))
    for entry in settings.guest_host_ports:
        protocol, _, number = entry.partition("/")
        services.append(HostService("udp" if protocol == "udp" else "tcp", int(number)))
    return NetworkConfig(
        scope=scope_of(settings.state_dir),
        subnet=settings.sandbox_subnet,
        egress=settings.sandbox_egress,
        dns=parse_dns(settings.guest_dns),
        host_services=tuple(dict.fromkeys(services)),
        # With proxy pools each guest reaches only what its session's egress grants (docs/egress.md).
        per_guest=bool(settings.egress_pools),
        media=MediaNat(
            settings.media_public_ip,
            settings.media_port_min,
            settings.media_port_max,
            settings.media_guest_port,
        )
        if settings.media_public_ip is not None
        else None,
    )
