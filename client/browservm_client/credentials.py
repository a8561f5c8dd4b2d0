"""The credential sets stored for a user: what and whose (never the secrets), and forgetting one."""

from __future__ import annotations

from pydantic import TypeAdapter

from browservm_client._operations import operation
from browservm_client._transport import AsyncTransport, Request, Transport, path
from browservm_client.models import CredentialOut

CREDENTIALS = "/v1/users/{user_id}/credentials"
CREDENTIAL = "/v1/users/{user_id}/credentials/{credential_id}"

_LIST: TypeAdapter[list[CredentialOut]] = TypeAdapter(list[CredentialOut])


class Credentials:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    @operation("GET", CREDENTIALS)
    def list(self, user_id: str) -> list[CredentialOut]:
        """The user's live credential sets, newest first."""
        return _LIST.validate_json(self._t.send(Request("GET", path(CREDENTIALS, user_id=user_id))).content)

    @operation("DELETE", CREDENTIAL)
    def delete(self, user_id: str, credential_id: str) -> None:
        """Forget a credential set: its sealed copy is erased (files already in the CLI VM stay)."""
        self._t.send(Request("DELETE", path(CREDENTIAL, user_id=user_id, credential_id=credential_id)))


class AsyncCredentials:
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    @operation("GET", CREDENTIALS)
    async def list(self, user_id: str) -> list[CredentialOut]:
        """The user's live credential sets, newest first."""
        response = await self._t.send(Request("GET", path(CREDENTIALS, user_id=user_id)))
        return _LIST.validate_json(response.content)

    @operation("DELETE", CREDENTIAL)
    async def delete(self, user_id: str, credential_id: str) -> None:
        """Forget a credential set: its sealed copy is erased (files already in the CLI VM stay)."""
        await self._t.send(Request("DELETE", path(CREDENTIAL, user_id=user_id, credential_id=credential_id)))
