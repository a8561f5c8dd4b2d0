"""Prometheus metrics, in a registry of the application's own (tests build many applications)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("browservm_sessions", "Sessions by status", ["status"], registry=self.registry)
        self.session_duration = Histogram(
            "browservm_session_duration_seconds",
            "Time from creation to the end of a session, by final status",
            ["status"],
            buckets=(5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600),
            registry=self.registry,
        )
        self.time_to_ready = Histogram(
            "browservm_session_time_to_awaiting_user_seconds",
            "Time from creation until the user can act (login page open in the browser)",
            buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120),
            registry=self.registry,
        )
        self.sandboxes = Gauge("browservm_sandboxes", "Sandboxes by state", ["state"], registry=self.registry)
        self.sandbox_boot = Histogram(
            "browservm_sandbox_boot_seconds",
            "Time from create to the agent's hello (how: boot, or restore from a snapshot)",
            ["backend", "how"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
            registry=self.registry,
        )
        self.queue = Gauge(
            "browservm_sessions_queued", "Sessions waiting for sandbox capacity", registry=self.registry
        )
        self.refused = Counter(
            "browservm_sessions_refused_total",
            "Sessions refused for lack of capacity",
            registry=self.registry,
        )
        self.api_latency = Histogram(
            "browservm_http_request_duration_seconds",
            "API latency by route and status class",
            ["method", "route", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.warm_pool_idle = Gauge(
            "browservm_warm_pool_idle", "Warm browser sandboxes ready for a session", registry=self.registry
        )
        self.warm_pool_takes = Counter(
            "browservm_warm_pool_takes_total",
            "Sessions that found a warm sandbox (hit) or booted their own (miss); idle ones given to CLI VMs",
            ["result"],
            registry=self.registry,
        )
        self.egress_assignments = Gauge(
            "browservm_egress_assignments",
            "Users assigned to each egress pool, by their exit's last check (unchecked, ok, bad)",
            ["pool", "status"],
            registry=self.registry,
        )
        self.egress_checks = Counter(
            "browservm_egress_checks_total",
            "Checks through a user's proxy, by pool and result",
            ["pool", "result"],
            registry=self.registry,
        )
        self.egress_check_seconds = Histogram(
            "browservm_egress_check_seconds",
            "Time of one check through a proxy (the check URL fetched through it)",
            ["pool"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.egress_sessions = Counter(
            "browservm_egress_sessions_total",
            "Sessions by how their guest left: proxy, direct (policy), fallback_direct, failed (proxy down)",
            ["pool", "outcome"],
            registry=self.registry,
        )
        self.reconciles = Counter(
            "browservm_reconcile_actions_total", "What the reconciler did", ["action"], registry=self.registry
        )

    def set_counts(self, gauge: Gauge, counts: dict[str, int], labels: list[str]) -> None:
        for label in labels:
            gauge.labels(label).set(counts.get(label, 0))


class LatencyMiddleware:
    """Observe each HTTP request under its route template (``/v1/sessions/{session_id}``), not its path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.api_latency.labels(scope["method"], template, f"{status // 100}xx").observe(
                time.perf_counter() - started
            )
