"""What the end user's page is told about its session: the status, its place in line, and why it ended,
in words for the user.

The operator's API carries the technical reason (``browser sandbox did not start: SandboxBootTimeout …``);
the person in front of the viewer gets a sentence they can act on instead, and never internal detail
(paths, console tails, provider output).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from browservm.store.models import Session
from browservm.store.states import SessionStatus


class ViewerStatus(BaseModel):
    """One state of the session as its viewer shows it (the ``browservm-session`` event's ``detail``)."""

    session_id: str
    status: SessionStatus
    reason: str = Field(
        description="For endings: why, in words for the user (the API's own `reason` is for the operator)"
    )
    queue_position: int | None = Field(
        default=None, description="1-based place in line while the session waits for a free browser"
    )


def viewer_status(session: Session, queue_position: int | None) -> ViewerStatus:
    status = SessionStatus(session.status)
    return ViewerStatus(
        session_id=session.id,
        status=status,
        reason=user_reason(status, session.reason),
        queue_position=queue_position if status is SessionStatus.PENDING else None,
    )


# Technical reasons by what they start with or contain, most specific first.
_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("clinotinstalled", "not installed"),
        "This sign-in is not available right now: the tool it needs is not installed on the server.",
    ),
    (
        ("produced no credential files",),
        "You signed in, but the tool did not save the sign-in. Please try again.",
    ),
    (
        ("login failed", "login did not start", "login runner"),
        "The sign-in did not go through: the tool stopped before it was finished. Please try again.",
    ),
    (
        ("sandbox", "controller restarted", "guest agent"),
        "The remote browser stopped working. Please try again.",
    ),
)


def user_reason(status: SessionStatus, reason: str) -> str:
    """A sentence for the end user about how the session ended; empty while it is live or completed."""
    if status is SessionStatus.CANCELLED:
        return "The sign-in was cancelled by the service that opened it."
    if status is SessionStatus.EXPIRED:
        return "The sign-in was not finished in time and has been closed."
    if status is SessionStatus.FAILED:
        lowered = reason.lower()
        for needles, sentence in _FAILURES:
            if any(needle in lowered for needle in needles):
                return sentence
        return "Something went wrong on the server. Please try again."
    return ""
