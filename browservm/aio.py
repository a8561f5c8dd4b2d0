"""Small asyncio helpers the controller and the guest share."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel ``tasks`` and wait until every one has ended; their errors are dropped.

    Unlike ``task.cancel(); with suppress(CancelledError): await task``, a cancellation of the *caller*
    while it waits still propagates: swallowing it would leave the caller running after it was stopped.
    """
    current = asyncio.current_task()
    pending = {task for task in tasks if task is not None and task is not current}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it as never retrieved


EXIT_POLL_S = 0.005


async def wait_exited(process: asyncio.subprocess.Process) -> int:
    """The exit status of ``process`` as soon as it has exited.

    ``Process.wait()`` also waits until the process's pipes are closed, so a helper that left its process
    group and inherited stdout would hide the exit for as long as it lives. A pidfd becomes readable when
    the process itself exits; asyncio's child watcher records the status a moment later.
    """
    if process.returncode is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        pidfd = None  # already reaped: the status is on its way
    if pidfd is not None:
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    # The watcher thread has reaped it, or is about to; its callback is queued on this loop.
    while process.returncode is None:  # noqa: ASYNC110 (asyncio offers no event for it but wait())
        await asyncio.sleep(EXIT_POLL_S)
    return process.returncode
