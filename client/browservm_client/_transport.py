"""HTTP for the client: configuration, URLs, retries with backoff, and API errors as exceptions.

The policy is written once (:func:`retry_wait`, :func:`error_of`, :class:`Config`); the sync and
async transports differ only in how they wait and send.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from browservm_client import __version__
from browservm_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ConfigurationError,
    api_error,
)

DEFAULT_URL = "http://127.0.0.1:8080"
"""Where ``scripts/run.sh`` serves the controller."""

RETRY_STATUSES = frozenset({429, 503})
"""Answers that mean "not now": nothing was done, the same request may succeed later."""

MAX_RETRY_AFTER_S = 60.0
"""A longer ``Retry-After`` is not slept through: the error is raised at once, carrying the delay."""

STREAM_READ_TIMEOUT_S = 45.0
"""The controller pings a quiet event stream every 15 s; three missed pings mean the connection is dead."""


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str
    timeout: httpx.Timeout
    max_retries: int

    @classmethod
    def resolve(
        cls, api_key: str | None, base_url: str | None, timeout: float | httpx.Timeout, max_retries: int
    ) -> Config:
        key = api_key or os.environ.get("BROWSERVM_API_KEY", "")
        if not key:
            raise ConfigurationError(
                "no API key: pass api_key= or set BROWSERVM_API_KEY (the controller prints one on its "
                "first start; 'browservm keys create --name NAME' makes another)"
            )
        url = (base_url or os.environ.get("BROWSERVM_URL") or DEFAULT_URL).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(
                f"BROWSERVM_URL must be an http or https URL like {DEFAULT_URL}, not {url!r}"
            )
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be 0 or more, not {max_retries}")
        return cls(
            base_url=url,
            api_key=key,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            max_retries=max_retries,
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": f"browservm-client/{__version__}"}

    def stream_timeout(self, deadline: float | None = None) -> httpx.Timeout:
        """A stream may stay quiet between pings: the read timeout must outlast them. With a
        ``deadline`` (``time.monotonic()``), no read waits past it."""
        read = max(self.timeout.read or 0.0, STREAM_READ_TIMEOUT_S)
        if deadline is not None:
            read = min(read, max(0.01, deadline - time.monotonic()))
        return httpx.Timeout(
            connect=self.timeout.connect, read=read, write=self.timeout.write, pool=self.timeout.pool
        )


def path(route: str, **params: str) -> str:
    """``route`` with its ``{name}`` parts filled in, each quoted as one path segment."""
    for name, value in params.items():
        if value in ("", ".", ".."):
            raise ValueError(f"{name} must be an id, not {value!r}")
    return route.format(**{name: quote(value, safe="") for name, value in params.items()})


def retry_wait(response: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before sending ``response``'s request again, or None when it must not be retried.

    The API's ``Retry-After`` wins; without one, :func:`backoff`.
    """
    if response.status_code not in RETRY_STATUSES:
        return None
    after = retry_after(response)
    if after is not None:
        return after if after <= MAX_RETRY_AFTER_S else None
    return backoff(attempt)


def backoff(attempt: int) -> float:
    """Exponential with jitter: about 0.5 s, 1 s, 2 s… up to 8 s, so retrying clients do not march in step."""
    return float(min(8.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))  # noqa: S311 (jitter, not secrets)


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_of(response: httpx.Response, body: bytes) -> APIError:
    """The :class:`APIError` for an answer of 400 or more; the API's body gives code and message."""
    code, message = "http_error", response.reason_phrase or "error"
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        # Not the API's body: a proxy in front answered. Its text is the best message there is.
        text = body.decode(errors="replace").strip()
        if text:
            message = text[:500]
    return api_error(response.status_code, code, message, retry_after=retry_after(response))


def _resendable(request: Request, exc: httpx.TransportError) -> bool:
    """A request that never reached the controller may be sent again; a GET may be repeated anyway."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or request.method == "GET"


def _connection_error(url: str, exc: httpx.TransportError) -> APIConnectionError:
    kind = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return kind(url, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    timeout: httpx.Timeout | None = None
    answers: frozenset[int] = frozenset()
    """Error statuses that are an answer here, returned instead of raised (``/readyz``'s 503)."""


def _build(http: httpx.Client | httpx.AsyncClient, config: Config, request: Request) -> httpx.Request:
    return http.build_request(
        request.method,
        config.base_url + request.url,
        params={k: v for k, v in (request.params or {}).items() if v is not None},
        json=request.json,
        headers={**config.headers, **(request.headers or {})},
        timeout=request.timeout or config.timeout,
    )


class Transport:
    """Sync: one ``httpx.Client``, retries by sleeping."""

    def __init__(self, config: Config, http: httpx.Client | None) -> None:
        self.config = config
        self._owned = http is None
        self._http = http or httpx.Client(timeout=config.timeout)

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def send(self, request: Request, *, stream: bool = False) -> httpx.Response:
        """The answer to ``request`` once it is not an error (else raised), after retries."""
        attempt = 0
        while True:
            try:
                response = self._http.send(_build(self._http, self.config, request), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.config.max_retries or not _resendable(request, exc):
                    raise _connection_error(self.config.base_url, exc) from exc
                time.sleep(backoff(attempt))
                attempt += 1
                continue
            if response.status_code < 400 or response.status_code in request.answers:
                return response
            body = response.read()
            response.close()
            wait = retry_wait(response, attempt)
            if wait is None or attempt >= self.config.max_retries:
                raise error_of(response, body)
            time.sleep(wait)
            attempt += 1

    @contextlib.contextmanager
    def stream(self, request: Request) -> Iterator[httpx.Response]:
        response = self.send(request, stream=True)
        try:
            yield response
        finally:
            response.close()


class AsyncTransport:
    """Async: one ``httpx.AsyncClient``, retries by ``asyncio.sleep``."""

    def __init__(self, config: Config, http: httpx.AsyncClient | None) -> None:
        self.config = config
        self._owned = http is None
        self._http = http or httpx.AsyncClient(timeout=config.timeout)

    async def close(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def send(self, request: Request, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(_build(self._http, self.config, request), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.config.max_retries or not _resendable(request, exc):
                    raise _connection_error(self.config.base_url, exc) from exc
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            if response.status_code < 400 or response.status_code in request.answers:
                return response
            body = await response.aread()
            await response.aclose()
            wait = retry_wait(response, attempt)
            if wait is None or attempt >= self.config.max_retries:
                raise error_of(response, body)
            await asyncio.sleep(wait)
            attempt += 1

    @contextlib.asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[httpx.Response]:
        response = await self.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()
