"""A user's egress: the exit their sessions leave through (never its password), checking it, rotating it."""

from __future__ import annotations

from browservm_client._operations import operation
from browservm_client._transport import AsyncTransport, Request, Transport, path
from browservm_client.models import EgressOut

EGRESS = "/v1/users/{user_id}/egress"
ROTATE = "/v1/users/{user_id}/egress/rotate"
CHECK = "/v1/users/{user_id}/egress/check"


class Egress:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    @operation("GET", EGRESS)
    def get(self, user_id: str) -> EgressOut:
        """The user's exit (assigned now if they have none)."""
        return EgressOut.model_validate_json(
            self._t.send(Request("GET", path(EGRESS, user_id=user_id))).content
        )

    @operation("POST", ROTATE)
    def rotate(self, user_id: str) -> EgressOut:
        """Move the user to another exit; their next session leaves through it."""
        return EgressOut.model_validate_json(
            self._t.send(Request("POST", path(ROTATE, user_id=user_id))).content
        )

    @operation("POST", CHECK)
    def check(self, user_id: str) -> EgressOut:
        """Check the user's exit through its proxy now; the answer has what the check saw."""
        return EgressOut.model_validate_json(
            self._t.send(Request("POST", path(CHECK, user_id=user_id))).content
        )


class AsyncEgress:
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    @operation("GET", EGRESS)
    async def get(self, user_id: str) -> EgressOut:
        """The user's exit (assigned now if they have none)."""
        response = await self._t.send(Request("GET", path(EGRESS, user_id=user_id)))
        return EgressOut.model_validate_json(response.content)

    @operation("POST", ROTATE)
    async def rotate(self, user_id: str) -> EgressOut:
        """Move the user to another exit; their next session leaves through it."""
        response = await self._t.send(Request("POST", path(ROTATE, user_id=user_id)))
        return EgressOut.model_validate_json(response.content)

    @operation("POST", CHECK)
    async def check(self, user_id: str) -> EgressOut:
        """Check the user's exit through its proxy now; the answer has what the check saw."""
        response = await self._t.send(Request("POST", path(CHECK, user_id=user_id)))
        return EgressOut.model_validate_json(response.content)
