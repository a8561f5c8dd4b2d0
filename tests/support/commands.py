"""Running commands in a CLI sandbox through its channel, as the controller's exec does."""

from __future__ import annotations

import asyncio
import base64

from browservm import protocol
from browservm.sandbox.channel import Channel


async def shell(channel: Channel, script: str, timeout_s: float = 20) -> tuple[int, str]:
    """Run ``script`` in a CLI sandbox as its user would: the exit code, and stdout and stderr together."""
    command = await channel.exec(protocol.Exec(argv=["sh", "-c", script + " 2>&1"], timeout_s=timeout_s))
    output = b""
    try:
        async with asyncio.timeout(timeout_s + 5):
            async for event in command:
                if isinstance(event, protocol.ExecOutput):
                    output += base64.b64decode(event.data_b64)
                else:
                    return event.exit_code, output.decode(errors="replace")
    finally:
        await command.close()
    raise AssertionError("the command's output ended without its exit")
