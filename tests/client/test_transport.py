"""Configuration, retries, timeouts and error mapping, against real sockets and a real controller."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from browservm_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    ConfigurationError,
    ServerError,
    TooManyRequests,
)
from browservm_client._transport import MAX_RETRY_AFTER_S, error_of, retry_wait
from tests.controller.conftest import Controller, controller_settings, free_port, run_controller


def test_the_key_and_url_come_from_arguments_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROWSERVM_API_KEY", raising=False)
    monkeypatch.delenv("BROWSERVM_URL", raising=False)
    with pytest.raises(ConfigurationError, match="BROWSERVM_API_KEY"):
        Client()
    assert Client("k").base_url == "http://127.0.0.1:8080"  # where scripts/run.sh serves
    monkeypatch.setenv("BROWSERVM_API_KEY", "from-env")
    monkeypatch.setenv("BROWSERVM_URL", "https://bvm.example.com/")
    client = Client()
    assert client.base_url == "https://bvm.example.com" and "from-env" not in repr(client)
    assert Client("k", base_url="http://other:9000").base_url == "http://other:9000"
    with pytest.raises(ConfigurationError, match="http or https"):
        Client("k", base_url="bvm.example.com")


async def test_the_environment_reaches_a_real_controller(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", controller.key)
    monkeypatch.setenv("BROWSERVM_URL", controller.url)
    async with AsyncClient() as client:
        assert await client.health()
        ready = await client.ready()
        assert ready.ready and ready.checks["database"] == "ok"


def test_nothing_listening_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(APIConnectionError, match=url), Client("k", base_url=url, max_retries=1) as client:
        client.sessions.get("ses_x")
    assert time.monotonic() - started < 5  # one retry after a short backoff, not a hang


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_silent_controller_is_a_timeout(silent_port: int) -> None:
    started = time.monotonic()
    with (
        pytest.raises(APITimeoutError),
        Client("k", base_url=f"http://127.0.0.1:{silent_port}", timeout=0.3) as c,
    ):
        c.sessions.create(user_id="u", provider="demo")  # a POST that may have arrived: not resent
    assert time.monotonic() - started < 2


async def test_a_full_host_is_retried_after_its_retry_after(tmp_path: Path, database_url: str) -> None:
    settings = controller_settings(tmp_path, database_url, max_sandboxes=1, max_queued_sessions=0)
    async with run_controller(settings) as controller:
        first = AsyncClient(controller.key, base_url=controller.url)
        holder = await first.sessions.create(user_id="holder", provider="demo")

        impatient = AsyncClient(controller.key, base_url=controller.url, max_retries=0)
        with pytest.raises(TooManyRequests) as full:
            await impatient.sessions.create(user_id="second", provider="demo")
        assert full.value.code == "capacity_exhausted" and full.value.retry_after == 10

        patient = AsyncClient(controller.key, base_url=controller.url, max_retries=1)
        started = time.monotonic()
        second = asyncio.create_task(patient.sessions.create(user_id="second", provider="demo"))
        while "browservm_sessions_refused_total 2.0" not in await first.metrics():  # refused once more
            await asyncio.sleep(0.05)
        await first.sessions.cancel(holder.id)
        created = await second
        assert created.user_id == "second"
        # It waited the controller's Retry-After (10 s), not its own short backoff.
        assert 9.5 <= time.monotonic() - started < 20
        await first.sessions.cancel(created.id)
        for client in (first, impatient, patient):
            await client.close()


def test_the_retry_policy() -> None:
    def answer(status: int, **headers: str) -> httpx.Response:
        return httpx.Response(status, headers=headers)

    assert retry_wait(answer(503, **{"Retry-After": "2"}), 0) == 2
    assert 0.25 <= (retry_wait(answer(503), 0) or 0) <= 0.5
    assert 1.0 <= (retry_wait(answer(429), 2) or 0) <= 2.0
    assert retry_wait(answer(429, **{"Retry-After": str(int(MAX_RETRY_AFTER_S) + 1)}), 0) is None
    date = httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_wait(date, 0) == 0  # a date in the past: now
    for status in (400, 404, 409, 422, 500, 502):
        assert retry_wait(answer(status), 0) is None


def test_an_answer_that_is_not_the_apis_still_becomes_an_error() -> None:
    error = error_of(httpx.Response(502), b"<html>Bad Gateway</html>")
    assert isinstance(error, ServerError) and error.code == "http_error" and "Bad Gateway" in error.message
    api = error_of(httpx.Response(409), b'{"error": {"code": "cli_vm_exists", "message": "has one"}}')
    assert (api.status, api.code, api.message) == (409, "cli_vm_exists", "has one")
