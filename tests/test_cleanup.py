"""The cleanup stack the backends and the controller build sandboxes with: undos run last first on a
failure, one failing undo does not stop the others nor hide the failure that started them, and a kept
stack undoes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from browservm.cleanup import Cleanup


async def build(steps: Callable[[Cleanup], None], failure: BaseException, **context: str) -> None:
    """Take resources (``steps`` registers their undos), then fail with ``failure``."""
    async with Cleanup("test.undo_failed", **context) as undo:
        steps(undo)
        raise failure


async def test_a_failure_runs_the_undos_last_first_and_is_raised() -> None:
    undone: list[str] = []

    async def release(what: str) -> None:
        undone.append(what)

    def steps(undo: Cleanup) -> None:
        undo.push(release, "directory")
        undo.callback(undone.append, "logs")
        undo.push(release, what="tap")

    with pytest.raises(RuntimeError, match="the VM did not start"):
        await build(steps, RuntimeError("the VM did not start"))
    assert undone == ["tap", "logs", "directory"]


async def test_a_failing_undo_is_logged_and_the_rest_still_run() -> None:
    undone: list[str] = []

    async def detach_tap() -> None:
        raise OSError("no such device")

    def forget() -> None:
        raise ValueError("already forgotten")

    def steps(undo: Cleanup) -> None:
        undo.callback(undone.append, "directory")
        undo.callback(forget)
        undo.push(detach_tap)

    with capture_logs() as logs, pytest.raises(RuntimeError, match="boom"):
        await build(steps, RuntimeError("boom"), sandbox_id="sbx_1")
    assert undone == ["directory"]
    failed = [entry for entry in logs if entry["event"] == "test.undo_failed"]
    assert [(entry["step"], entry["error"]) for entry in failed] == [
        ("detach_tap", "no such device"),
        ("forget", "already forgotten"),
    ]
    assert {entry["sandbox_id"] for entry in failed} == {"sbx_1"}


async def test_a_kept_stack_undoes_nothing_even_if_a_later_step_fails() -> None:
    undone: list[str] = []

    def steps(undo: Cleanup) -> None:
        undo.callback(undone.append, "directory")
        undo.keep()

    with pytest.raises(RuntimeError):
        await build(steps, RuntimeError("after the sandbox was handed over"))
    assert undone == []


async def test_a_cancelled_start_still_undoes() -> None:
    undone: list[str] = []

    async def release(what: str) -> None:
        undone.append(what)

    with pytest.raises(asyncio.CancelledError):
        await build(lambda undo: undo.push(release, "tap"), asyncio.CancelledError())
    assert undone == ["tap"]
