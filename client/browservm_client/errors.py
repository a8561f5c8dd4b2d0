"""What the client raises. An answer of the API that is an error becomes an :class:`APIError` subclass
carrying the API's ``code`` (for programs to switch on) and ``message`` (for people to act on)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from browservm_client.models import ExecOutput, SessionOut, SessionStatus


class BrowserVMError(Exception):
    """Anything this client raises on purpose."""


class ConfigurationError(BrowserVMError):
    """The client cannot be built as asked (no API key, a URL that is not http or https)."""


class APIConnectionError(BrowserVMError):
    """The controller could not be reached, or the connection broke before an answer."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot reach the browservm controller at {url}: {detail}")
        self.url = url


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""


class APIError(BrowserVMError):
    """The API answered with an error: ``{"error": {"code", "message"}}`` and an HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        """Seconds the API asked to wait before retrying (``Retry-After``), when it said."""


class BadRequest(APIError):
    """400: malformed (invalid JSON, a bad cursor)."""


class AuthenticationError(APIError):
    """401: the API key is missing, unknown or revoked."""


class PermissionDenied(APIError):
    """403: the key is valid but not for this resource."""


class NotFound(APIError):
    """404: no such session, CLI VM or credential for this API key."""


class Conflict(APIError):
    """409: the resource is not in a state that allows this (e.g. ``cli_vm_exists``, ``session_ended``)."""


class RequestTooLarge(APIError):
    """413: the request body is over the controller's limit."""


class InvalidRequest(APIError):
    """422: a field is invalid; the message names it."""


class TooManyRequests(APIError):
    """429: the host is at capacity (``capacity_exhausted``) or the key is rate limited; retried first."""


class ServerError(APIError):
    """5xx: the controller failed (its log has the details) or is unavailable."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: RequestTooLarge,
    422: InvalidRequest,
    429: TooManyRequests,
}


def api_error(status: int, code: str, message: str, *, retry_after: float | None = None) -> APIError:
    """The exception class for ``status``, built from the API's error body."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return kind(status, code, message, retry_after=retry_after)


class SessionEnded(BrowserVMError):
    """``sessions.wait`` saw the session end in a status it was not waiting for."""

    def __init__(self, session: SessionOut, wanted: Collection[SessionStatus]) -> None:
        reason = f" ({session.reason})" if session.reason else ""
        names = ", ".join(sorted(wanted))
        super().__init__(f"session {session.id} ended {session.status}{reason}, not {names}")
        self.session = session


class WaitTimeout(BrowserVMError, TimeoutError):
    """``sessions.wait`` ran out of time before the session reached a wanted status."""

    def __init__(
        self, session_id: str, wanted: Collection[SessionStatus], timeout: float, last: SessionStatus | None
    ) -> None:
        names = ", ".join(sorted(wanted))
        super().__init__(
            f"session {session_id} did not reach {names} within {timeout:g} s (last status: {last or 'unknown'})"
        )
        self.session_id = session_id
        self.last_status = last


class ExecInterrupted(BrowserVMError):
    """The output of a command in the CLI VM stopped before its exit code arrived; the command may still
    be running there."""

    def __init__(self, user_id: str, detail: str, output: list[ExecOutput]) -> None:
        super().__init__(f"the command in the CLI VM of {user_id!r} was cut off: {detail}")
        self.user_id = user_id
        self.output = output
        """What arrived before the cut."""
