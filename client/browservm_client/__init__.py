"""The Python client of the browservm API.

    from browservm_client import Client

    client = Client()  # $BROWSERVM_URL, $BROWSERVM_API_KEY
    session = client.sessions.create(user_id="alice", provider="demo")
    print(session.viewer_url)
    client.sessions.wait(session.id, "completed")

Every call: docs/client.md in the browservm repository.
"""

__version__ = "0.1.0"

from browservm_client._operations import operations_of
from browservm_client.cli_vms import ExecResult
from browservm_client.client import AsyncClient, Client
from browservm_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequest,
    BrowserVMError,
    ConfigurationError,
    Conflict,
    ExecInterrupted,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RequestTooLarge,
    ServerError,
    SessionEnded,
    TooManyRequests,
    WaitTimeout,
)
from browservm_client.models import (
    CliVmOut,
    CredentialOut,
    EgressOut,
    ExecOutput,
    Readiness,
    SessionOut,
    SessionPage,
    SessionStatus,
)
from browservm_client.sessions import SessionEvent

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "BrowserVMError",
    "CliVmOut",
    "Client",
    "ConfigurationError",
    "Conflict",
    "CredentialOut",
    "EgressOut",
    "ExecInterrupted",
    "ExecOutput",
    "ExecResult",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "Readiness",
    "RequestTooLarge",
    "ServerError",
    "SessionEnded",
    "SessionEvent",
    "SessionOut",
    "SessionPage",
    "SessionStatus",
    "TooManyRequests",
    "WaitTimeout",
    "__version__",
    "operations_of",
]
