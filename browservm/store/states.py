"""The session and sandbox state machines: the one place that says which transition is legal.

The store applies a transition with a guarded ``UPDATE ... WHERE status IN (legal sources)``, so two
writers racing (the session flow and a cancel, or the reconciler) cannot both win, and an illegal
transition is refused and logged instead of applied.
"""

from __future__ import annotations

import enum

# The statuses are the API's (the client shares them); which transition is legal is the server's.
from browservm_client.models import TERMINAL_SESSION as TERMINAL_SESSION
from browservm_client.models import SessionStatus as SessionStatus

_ENDINGS = frozenset({SessionStatus.FAILED, SessionStatus.EXPIRED, SessionStatus.CANCELLED})

SESSION_TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    SessionStatus.PENDING: frozenset({SessionStatus.STARTING}) | _ENDINGS,
    SessionStatus.STARTING: frozenset({SessionStatus.AWAITING_USER}) | _ENDINGS,
    SessionStatus.AWAITING_USER: frozenset({SessionStatus.CAPTURING}) | _ENDINGS,
    # Once credentials are being captured the user has signed in; only a failure can stop it now.
    SessionStatus.CAPTURING: frozenset({SessionStatus.COMPLETED, SessionStatus.FAILED}),
    SessionStatus.COMPLETED: frozenset(),
    SessionStatus.FAILED: frozenset(),
    SessionStatus.EXPIRED: frozenset(),
    SessionStatus.CANCELLED: frozenset(),
}


def session_sources(target: SessionStatus) -> frozenset[SessionStatus]:
    """The states from which ``target`` may be entered."""
    return frozenset(src for src, targets in SESSION_TRANSITIONS.items() if target in targets)


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    READY = "ready"
    ASSIGNED = "assigned"
    HIBERNATED = "hibernated"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"


SANDBOX_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset(
        {SandboxState.READY, SandboxState.ASSIGNED, SandboxState.DESTROYING, SandboxState.FAILED}
    ),
    SandboxState.READY: frozenset({SandboxState.ASSIGNED, SandboxState.DESTROYING, SandboxState.FAILED}),
    SandboxState.ASSIGNED: frozenset({SandboxState.HIBERNATED, SandboxState.DESTROYING, SandboxState.FAILED}),
    SandboxState.HIBERNATED: frozenset({SandboxState.ASSIGNED, SandboxState.DESTROYING, SandboxState.FAILED}),
    SandboxState.DESTROYING: frozenset({SandboxState.DESTROYED, SandboxState.FAILED}),
    SandboxState.DESTROYED: frozenset(),
    # A failed sandbox still holds resources until it is destroyed.
    SandboxState.FAILED: frozenset({SandboxState.DESTROYING, SandboxState.DESTROYED}),
}

LIVE_SANDBOX = frozenset(
    {SandboxState.CREATING, SandboxState.READY, SandboxState.ASSIGNED, SandboxState.DESTROYING}
)
"""States that count against the host's capacity."""


def sandbox_sources(target: SandboxState) -> frozenset[SandboxState]:
    return frozenset(src for src, targets in SANDBOX_TRANSITIONS.items() if target in targets)


class IllegalTransition(Exception):
    def __init__(self, kind: str, ident: str, current: str, target: str) -> None:
        super().__init__(f"{kind} {ident}: illegal transition {current} -> {target}")
        self.current = current
        self.target = target
