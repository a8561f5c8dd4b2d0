"""Configuration, retries, timeouts and error mapping, against real sockets and a real controller."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from browservm_client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    Client,
    ConfigurationError,
    ServerError,
    TooManyRequests,
)
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


Answer = tuple[int, dict[str, str], bytes]
OK: Answer = (200, {"Content-Type": "application/json"}, b'{"status": "ok"}')
BUSY = b'{"error": {"code": "capacity_exhausted", "message": "full"}}'


class ScriptedServer:
    """A loopback HTTP server that gives its scripted answers in turn and notes when each request came."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = list(answers)
        self.times: list[float] = []
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                script.times.append(time.monotonic())
                status, headers, body = script.answers.pop(0)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.times)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*answers: Answer) -> ScriptedServer:
        servers.append(ScriptedServer(list(answers)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_busy_answer_is_sent_again_after_its_retry_after(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted((503, {"Retry-After": "1"}, BUSY), OK)
    with Client("k", base_url=server.url, max_retries=2) as client:
        assert client.health()
    assert len(server.times) == 2 and 0.95 <= server.gaps()[0] < 5


def test_without_retry_after_the_client_backs_off_a_little_more_each_time(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted((503, {}, BUSY), (429, {}, BUSY), OK)
    with Client("k", base_url=server.url, max_retries=2) as client:
        assert client.health()
    first, second = server.gaps()
    assert 0.24 <= first < 3 and 0.49 <= second < 5  # jittered: 0.25-0.5 s, then 0.5-1 s


def test_a_retry_after_past_the_clients_limit_is_raised_at_once(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted((429, {"Retry-After": "61"}, BUSY))
    with Client("k", base_url=server.url, max_retries=3) as client, pytest.raises(TooManyRequests) as busy:
        client.health()
    assert busy.value.retry_after == 61 and busy.value.code == "capacity_exhausted"
    assert len(server.times) == 1, "a wait of over a minute is the caller's to decide"


def test_a_retry_after_date_in_the_past_means_now(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted((503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, BUSY), OK)
    with Client("k", base_url=server.url, max_retries=1) as client:
        assert client.health()
    assert server.gaps()[0] < 0.24  # below the shortest backoff


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500, 502])
def test_other_errors_are_not_sent_again(scripted: Callable[..., ScriptedServer], status: int) -> None:
    body = b'{"error": {"code": "some_code", "message": "some reason"}}'
    server = scripted((status, {"Content-Type": "application/json"}, body))
    with Client("k", base_url=server.url, max_retries=3) as client, pytest.raises(APIError) as error:
        client.health()
    assert (error.value.status, error.value.code, error.value.message) == (status, "some_code", "some reason")
    assert len(server.times) == 1


def test_an_answer_that_is_not_the_apis_still_becomes_an_error(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted((502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>"))
    with Client("k", base_url=server.url, max_retries=0) as client, pytest.raises(ServerError) as error:
        client.health()
    assert error.value.code == "http_error" and "Bad Gateway" in error.value.message
