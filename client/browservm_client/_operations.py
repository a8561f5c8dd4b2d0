"""Which client method calls which API operation: the mark the OpenAPI coverage test reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__browservm_operation__"


def operation(method: str, route: str) -> Callable[[F], F]:
    """Mark a method as the client's call of ``method route`` (the route as the OpenAPI document spells it)."""

    def mark(function: F) -> F:
        setattr(function, _MARK, (method.upper(), route))
        return function

    return mark


def operations_of(client: object) -> dict[tuple[str, str], str]:
    """``(method, route) -> "sessions.create"`` for every marked method of ``client`` and its resources."""
    found: dict[tuple[str, str], str] = {}
    owners: list[tuple[str, object]] = [("", client)]
    owners += [(f"{name}.", value) for name, value in vars(client).items() if not name.startswith("_")]
    for prefix, owner in owners:
        for name in dir(type(owner)):
            mark = getattr(getattr(type(owner), name, None), _MARK, None)
            if mark is not None:
                found[mark] = prefix + name
    return found
