"""Exec output through the served API is flow-controlled end to end: a client that does not read its
``POST /v1/users/{user_id}/cli-vm/exec`` stream holds up its own command (blocked on its pipe, as in a shell
pipeline), not the controller's memory and not anyone else's requests; a client that reads gets every byte.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import psutil

from tests.controller.conftest import Controller
from tests.controller.demo_login import run_in_cli_vm
from tests.support.pipes import process_with_marker, until_blocked

MiB = 1024 * 1024


async def exec_output(stream: httpx.Response) -> tuple[str, int | None]:
    """What an exec's server-sent events carry, read at this test's pace: its output, and its exit code."""
    output: list[str] = []
    exit_code = None
    event = ""
    async for line in stream.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if event == "output":
                output.append(data["data"])
            elif event == "exit":
                exit_code = data["exit_code"]
    return "".join(output), exit_code


async def start_unread_exec(
    controller: Controller, user_id: str, body: dict[str, object]
) -> asyncio.StreamWriter:
    """Send the exec request on a raw connection and never read the answer."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", controller.settings.port)
    payload = json.dumps(body).encode()
    writer.write(
        f"POST /v1/users/{user_id}/cli-vm/exec HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {controller.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return writer


async def test_unread_exec_output_stays_bounded_and_read_output_is_complete(controller: Controller) -> None:
    client = controller.client
    assert (await client.post("/v1/users/flow/cli-vm")).status_code == 201
    assert await run_in_cli_vm(controller, "flow", ["echo", "warm"]) == ("warm\n", 0)
    me = psutil.Process()  # the controller serves from this process
    rss_before = me.memory_info().rss

    # The case: 200 MiB that nobody reads (the controller went from 103 to 394 MiB RSS).
    marker = secrets.token_hex(6)
    unread = await start_unread_exec(
        controller,
        "flow",
        {"argv": ["head", "-c", "200M", "/dev/zero"], "env": {"BVM_TEST_MARKER": marker}, "timeout_s": 600},
    )
    try:
        head = await process_with_marker(marker)
        written = await until_blocked(head)
        grown = me.memory_info().rss - rss_before
        assert written < 64 * MiB, f"the command wrote {written / MiB:.0f} MiB that nobody read"
        assert grown < 48 * MiB, f"the controller grew by {grown / MiB:.0f} MiB for output nobody read"
        # Meanwhile the channel serves everyone else: another command comes and goes.
        assert await run_in_cli_vm(controller, "flow", ["echo", "still flowing"]) == ("still flowing\n", 0)
    finally:
        unread.close()
    # The client went away: its command's pipe breaks, it ends long before its 600 s timeout.
    await asyncio.to_thread(head.wait, 20)
    assert not head.is_running()

    # A client that pauses until its command blocks, then reads: every line arrives, in order.
    lines = 3_000_000
    marker = secrets.token_hex(6)
    body = {"argv": ["seq", "1", str(lines)], "env": {"BVM_TEST_MARKER": marker}}
    async with client.stream("POST", "/v1/users/flow/cli-vm/exec", json=body) as stream:
        assert stream.status_code == 200
        await until_blocked(await process_with_marker(marker))  # bigger than every buffer on the way
        text, exit_code = await exec_output(stream)
    assert exit_code == 0
    assert text == "".join(f"{n}\n" for n in range(1, lines + 1))
