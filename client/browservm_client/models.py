"""The API's request and response models: the controller answers with these and the client parses them.

This module is the contract of the REST API in code. The controller (``browservm.controller.api``)
imports its models from here, so a field added to a response is typed on both sides at once. It lives in
the client's distribution because that is the small package both sides install; it must import nothing
beyond pydantic and the standard library.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class SessionStatus(enum.StrEnum):
    """Where a sign-in session is. The server's state machine (``browservm/store/states.py``) says which
    transition is legal; these are the names both sides use."""

    PENDING = "pending"
    STARTING = "starting"
    AWAITING_USER = "awaiting_user"
    CAPTURING = "capturing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_SESSION


TERMINAL_SESSION = frozenset(
    {SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.EXPIRED, SessionStatus.CANCELLED}
)

Provider = Literal["claude_code", "codex", "gemini_cli", "demo"]

USER_ID_PATTERN = r"^[A-Za-z0-9._:@+-]+$"
USER_ID = Field(
    min_length=1,
    max_length=200,
    pattern=USER_ID_PATTERN,
    description="The operator's id for the end user (letters, digits and ._:@+-)",
)

# ------------------------------------------------------------------------------------------- sessions


class SessionCreate(BaseModel):
    user_id: str = USER_ID
    provider: Provider
    options: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=dict, max_length=16, description="Provider options, e.g. a demo issuer"
    )


class SessionOut(BaseModel):
    id: str
    user_id: str
    provider: str
    status: SessionStatus
    reason: str
    viewer_url: str
    login_url: str | None
    account: dict[str, Any]
    sandbox_id: str | None = Field(
        description="The browser sandbox serving the session (in logs and events), once it has one"
    )
    queue_position: int | None = Field(
        None,
        description="1-based place in line for a free sandbox while the session is pending and waits; null otherwise",
    )
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    ended_at: datetime | None


class SessionPage(BaseModel):
    data: list[SessionOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


class ViewerLink(BaseModel):
    """``POST /v1/sessions/{id}/viewer-token``: a fresh link for a live session's viewer."""

    viewer_url: str = Field(description="The page to open (or embed) for the end user; it holds the token")
    token: str = Field(description="The viewer token alone, for <browservm-viewer token=…>")
    expires_at: datetime = Field(description="When the token stops working (never after the session's end)")


# ------------------------------------------------------------------------------------------- users


class CliVmState(enum.StrEnum):
    """A CLI VM's own states (not its sandbox's pool words)."""

    STARTING = "starting"
    RUNNING = "running"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    RESUMING = "resuming"
    STOPPING = "stopping"
    FAILED = "failed"


class CliVmOut(BaseModel):
    user_id: str
    sandbox_id: str
    state: CliVmState = Field(
        description=(
            "`running`; `hibernating`, `resuming`, `stopping` while that operation runs; `hibernated`; "
            "`starting`; `failed` (delete it or create a new one)"
        )
    )
    created_at: datetime


class ExecRunOut(BaseModel):
    exec_id: str
    argv: list[str]
    started_at: datetime
    ended_at: datetime | None = Field(description="null while the command runs")
    exit_code: int | None
    timed_out: bool
    output: str = Field(description="stdout and stderr as they came; the last 64 KiB")
    truncated: bool = Field(description="true when earlier output was cut off")


class CliVmOutput(BaseModel):
    """``GET …/cli-vm/output``: what the last commands run through ``…/exec`` printed."""

    user_id: str
    runs: list[ExecRunOut] = Field(
        description="The CLI VM's last commands run through …/exec, newest first (kept in memory, not stored)"
    )


class ExecRequest(BaseModel):
    argv: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=256)
    env: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )
    timeout_s: float = Field(60.0, gt=0, le=3600)


class ExecOutput(BaseModel):
    """The data of one ``output`` event of ``POST …/cli-vm/exec``: a chunk of the command's output."""

    stream: Literal["stdout", "stderr"]
    data: str = Field(description="Decoded as UTF-8; undecodable bytes become U+FFFD")


class ExecExit(BaseModel):
    """The data of the ``exit`` event that ends ``POST …/cli-vm/exec``."""

    exit_code: int = Field(description="Negative: killed by that signal (a timeout is -9 with timed_out)")
    timed_out: bool = False


class ExecFailure(BaseModel):
    """The data of an ``error`` event: the command's output stopped before its exit was known."""

    message: str


EXEC_EVENTS: dict[str, type[BaseModel]] = {"output": ExecOutput, "exit": ExecExit, "error": ExecFailure}
"""The events of the exec stream by name: ``output``…, then ``exit`` or ``error``."""


class CredentialOut(BaseModel):
    id: str
    provider: str
    account: dict[str, Any] = Field(
        description="Email, account id, plan: what the CLI recorded; never a secret"
    )
    session_id: str | None
    created_at: datetime
    validated_at: datetime | None
    expires_at: datetime | None
    delivered_at: datetime | None


# ------------------------------------------------------------------------------------------- egress


class EgressOut(BaseModel):
    """``GET /v1/users/{user_id}/egress``: the exit the user's sessions leave through. Never the password."""

    user_id: str
    pool: str = Field(description="The upstream proxy pool (BROWSERVM_EGRESS_POOLS)")
    proxy: str = Field(description="scheme://host:port of the user's proxy, without credentials")
    port: int
    username: str | None = Field(description="The pool's username template, rendered for this user")
    generation: int = Field(description="How often the user was rotated")
    status: Literal["unchecked", "ok", "bad"] = Field(description="What the last check through it found")
    exit_address: str | None = Field(description="The address the last good check came out from")
    detail: str = Field(description="Why the last check failed; empty when it worked")
    checked_at: datetime | None
    created_at: datetime
    rotated_at: datetime | None


# ------------------------------------------------------------------------------------------- operations


class QueuedSession(BaseModel):
    session_id: str
    position: int = Field(description="1-based place in line")


class CapacityOut(BaseModel):
    """``GET /v1/capacity``: how much of the host is in use and who waits for a slot."""

    limit: int = Field(description="Sandboxes this host runs at once (BROWSERVM_MAX_SANDBOXES)")
    in_use: int = Field(description="Slots held now: sessions' browsers, CLI VMs, idle warm sandboxes")
    warm_idle: int = Field(description="Of those, idle warm sandboxes (any new session takes one)")
    queued: int = Field(description="Sessions of all tenants waiting for a slot")
    max_queued: int = Field(description="Waiting sessions past which new ones get 429")
    queue: list[QueuedSession] = Field(description="This tenant's waiting sessions, first in line first")


class Readiness(BaseModel):
    """``GET /readyz``: 200 when ready, 503 with the same body when not."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, Any] = Field(description="database, backend, capacity: what each check found")

    @property
    def ready(self) -> bool:
        return self.status == "ready"
