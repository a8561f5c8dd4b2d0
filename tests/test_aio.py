"""The asyncio helpers: cancelling without swallowing the caller's own cancellation, and noticing a
process's exit while something else still holds its output."""

from __future__ import annotations

import asyncio
import time

import pytest

from browservm.aio import cancel_and_wait, wait_exited


async def test_cancel_and_wait_ends_the_tasks_and_drops_their_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    sleeper = asyncio.create_task(asyncio.sleep(30))
    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait([sleeper, failed, None])
    assert sleeper.cancelled()
    assert isinstance(failed.exception(), RuntimeError)


async def test_a_caller_cancelled_while_it_waits_is_still_cancelled() -> None:
    """The pattern this replaces, ``task.cancel(); with suppress(CancelledError): await task``, swallows
    a cancellation aimed at the caller when it lands during the wait; the caller then runs on."""
    cleaning = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaning.set()
            await asyncio.shield(asyncio.sleep(0.3))

    ran_on = False

    async def caller(task: asyncio.Task[None]) -> None:
        nonlocal ran_on
        await cancel_and_wait([task])
        ran_on = True

    worker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(caller(worker))
    await cleaning.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert not ran_on


async def test_wait_exited_does_not_wait_for_a_pipe_a_helper_still_holds() -> None:
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", "sleep 5 & exit 7", stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(wait_exited(process), 4) == 7
        assert time.monotonic() - started < 4
        assert await wait_exited(process) == 7, "an exited process answers at once"
    finally:
        import os
        import signal

        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
