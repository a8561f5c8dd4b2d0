"""Every operation of the controller's OpenAPI document has a client method, sync and async alike."""

from __future__ import annotations

import inspect

from browservm_client import AsyncClient, Client, operations_of
from tests.controller.conftest import Controller

VIEWER_ONLY = {
    # Authenticated by the viewer token, not an API key: the viewer page in the user's browser calls
    # these (WebRTC signaling and its ICE servers); an operator's backend has no use for them.
    ("GET", "/v1/sessions/{session_id}/ice-servers"),
    ("POST", "/v1/sessions/{session_id}/whep"),
    ("PATCH", "/v1/sessions/{session_id}/whep/{peer_id}"),
    ("DELETE", "/v1/sessions/{session_id}/whep/{peer_id}"),
    ("GET", "/v1/sessions/{session_id}/viewer-events"),
}


async def test_every_operation_has_a_client_method(controller: Controller) -> None:
    document = (await controller.client.get("/openapi.json")).json()
    operations = {
        (method.upper(), route) for route, methods in document["paths"].items() for method in methods
    }
    assert operations >= VIEWER_ONLY, "an excluded viewer route is gone: drop it from VIEWER_ONLY"
    sync = operations_of(Client("key", base_url=controller.url))
    asynchronous = operations_of(AsyncClient("key", base_url=controller.url))

    missing = sorted(f"{method} {route}" for method, route in operations - VIEWER_ONLY - set(sync))
    assert not missing, f"operations without a method in browservm_client.Client: {missing}"
    assert not set(sync) - operations, (
        f"client methods for routes the API no longer has: {set(sync) - operations}"
    )
    assert sync == asynchronous, "Client and AsyncClient must offer the same calls under the same names"


def test_sync_and_async_calls_take_the_same_arguments() -> None:
    sync, asynchronous = Client("key"), AsyncClient("key")
    for name in operations_of(sync).values():
        a, b = _resolve(sync, name), _resolve(asynchronous, name)
        assert list(inspect.signature(a).parameters.values()) == list(
            inspect.signature(b).parameters.values()
        ), name
        assert inspect.iscoroutinefunction(b) or inspect.isasyncgenfunction(b) or name.endswith(".list"), name
    for resource in ("sessions",):
        for composite in ("wait", "viewer_url"):
            a, b = (
                _resolve(sync, f"{resource}.{composite}"),
                _resolve(asynchronous, f"{resource}.{composite}"),
            )
            assert inspect.signature(a).parameters.keys() == inspect.signature(b).parameters.keys()


def _resolve(client: object, dotted: str) -> object:
    target = client
    for part in dotted.split("."):
        target = getattr(target, part)
    return target
