"""The entry points: :class:`Client` (sync) and :class:`AsyncClient`, with the same surface."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from types import TracebackType

import httpx

from browservm_client import _sse
from browservm_client._operations import operation
from browservm_client._transport import AsyncTransport, Config, Request, Transport, backoff
from browservm_client.cli_vms import AsyncCliVms, CliVms
from browservm_client.credentials import AsyncCredentials, Credentials
from browservm_client.egress import AsyncEgress, Egress
from browservm_client.errors import APIConnectionError
from browservm_client.models import CapacityOut, Readiness
from browservm_client.sessions import MAX_RECONNECTS, AsyncSessions, SessionEvent, Sessions

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RETRIES = 2

_READY = Request("GET", "/readyz", answers=frozenset({503}))  # not ready is an answer, not an error
CAPACITY = "/v1/capacity"
EVENTS = "/v1/events"


def _events_request(config: Config, last: int) -> Request:
    headers = {"Last-Event-ID": str(last)} if last else None
    return Request("GET", EVENTS, headers=headers, timeout=config.stream_timeout())


class Client:
    """The browservm API, blocking.

    ``api_key`` defaults to ``$BROWSERVM_API_KEY`` and ``base_url`` to ``$BROWSERVM_URL``, then to
    ``http://127.0.0.1:8080`` (where ``scripts/run.sh`` serves). ``timeout`` (seconds, or an
    ``httpx.Timeout``) bounds every request; answers 429 and 503 are retried up to ``max_retries`` times,
    after the ``Retry-After`` the API gives. Pass ``http_client`` to bring your own ``httpx.Client``
    (proxies, TLS settings); the client then leaves closing it to you.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._transport = Transport(Config.resolve(api_key, base_url, timeout, max_retries), http_client)
        self.sessions = Sessions(self._transport)
        self.cli_vms = CliVms(self._transport)
        self.credentials = Credentials(self._transport)
        self.egress = Egress(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"  # never the key

    @operation("GET", "/healthz")
    def health(self) -> bool:
        """True when the controller's process answers (raises when it cannot be reached)."""
        return bool(self._transport.send(Request("GET", "/healthz")).json().get("status") == "ok")

    @operation("GET", "/readyz")
    def ready(self) -> Readiness:
        """Whether the controller can serve sessions now (database, sandbox backend), and its capacity."""
        return Readiness.model_validate_json(self._transport.send(_READY).content)

    @operation("GET", "/metrics")
    def metrics(self) -> str:
        """The Prometheus exposition, as text."""
        return self._transport.send(Request("GET", "/metrics")).text

    @operation("GET", CAPACITY)
    def capacity(self) -> CapacityOut:
        """Sandbox slots in use on the host, and your sessions waiting for one, first in line first."""
        return CapacityOut.model_validate_json(self._transport.send(Request("GET", CAPACITY)).content)

    @operation("GET", EVENTS)
    def events(self, *, after: int | None = None) -> Iterator[SessionEvent]:
        """Every event of your tenant from now (or after event ``after``), live and without end: sessions,
        their sandboxes, CLI VMs. A dropped connection is reopened from the last event received."""
        last, failures = after or 0, 0
        while True:
            try:
                with self._transport.stream(_events_request(self._transport.config, last)) as response:
                    decoder = _sse.Decoder()
                    for line in response.iter_lines():
                        if (sse := decoder.feed(line)) is not None:
                            event = SessionEvent.parse(sse)
                            last, failures = event.id, 0
                            yield event
            except (httpx.TransportError, APIConnectionError) as exc:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise APIConnectionError(self.base_url, f"event stream kept dropping: {exc}") from exc
                time.sleep(backoff(failures - 1))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The browservm API for asyncio: the same calls as :class:`Client`, awaited (and ``async for``)."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._transport = AsyncTransport(Config.resolve(api_key, base_url, timeout, max_retries), http_client)
        self.sessions = AsyncSessions(self._transport)
        self.cli_vms = AsyncCliVms(self._transport)
        self.credentials = AsyncCredentials(self._transport)
        self.egress = AsyncEgress(self._transport)

    @property
    def base_url(self) -> str:
        return self._transport.config.base_url

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    @operation("GET", "/healthz")
    async def health(self) -> bool:
        """True when the controller's process answers (raises when it cannot be reached)."""
        return bool((await self._transport.send(Request("GET", "/healthz"))).json().get("status") == "ok")

    @operation("GET", "/readyz")
    async def ready(self) -> Readiness:
        """Whether the controller can serve sessions now (database, sandbox backend), and its capacity."""
        return Readiness.model_validate_json((await self._transport.send(_READY)).content)

    @operation("GET", "/metrics")
    async def metrics(self) -> str:
        """The Prometheus exposition, as text."""
        return (await self._transport.send(Request("GET", "/metrics"))).text

    @operation("GET", CAPACITY)
    async def capacity(self) -> CapacityOut:
        """Sandbox slots in use on the host, and your sessions waiting for one, first in line first."""
        return CapacityOut.model_validate_json((await self._transport.send(Request("GET", CAPACITY))).content)

    @operation("GET", EVENTS)
    async def events(self, *, after: int | None = None) -> AsyncIterator[SessionEvent]:
        """Every event of your tenant from now (or after event ``after``), live and without end: sessions,
        their sandboxes, CLI VMs. A dropped connection is reopened from the last event received."""
        last, failures = after or 0, 0
        while True:
            try:
                async with self._transport.stream(_events_request(self._transport.config, last)) as response:
                    decoder = _sse.Decoder()
                    async for line in response.aiter_lines():
                        if (sse := decoder.feed(line)) is not None:
                            event = SessionEvent.parse(sse)
                            last, failures = event.id, 0
                            yield event
            except (httpx.TransportError, APIConnectionError) as exc:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise APIConnectionError(self.base_url, f"event stream kept dropping: {exc}") from exc
                await asyncio.sleep(backoff(failures - 1))

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()
