"""Watching and driving a sandbox's page through its Chromium's DevTools debugging port (opened by
``Debug.devtools_port`` beside the agent's pipe), from inside the sandbox's network when it has one."""

from __future__ import annotations

import asyncio
import json

import httpx
import websockets.asyncio.client

from browservm import protocol
from browservm.sandbox.channel import Channel
from tests.support.netns import in_netns


async def page_url(devtools_port: int, netns: str | None = None) -> str:
    """The URL of the page the sandbox's Chromium shows, asked of its DevTools port (from inside the
    sandbox's network namespace when it has one)."""

    async def ask() -> str:
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
        return str(next(t["url"] for t in targets if t["type"] == "page"))

    return await (ask() if netns is None else in_netns(netns, ask))


async def eventually_page_url(channel: Channel, expected: str, netns: str | None = None) -> None:
    async with asyncio.timeout(10):
        while True:
            status = await channel.request(protocol.Status())
            if status.devtools_port and await page_url(status.devtools_port, netns) == expected:
                return
            await asyncio.sleep(0.1)


async def evaluate_in_page(devtools_port: int, expression: str, netns: str | None = None) -> object:
    """Run JavaScript in the sandbox's page, as the user's clicks and typing would act on it."""

    async def run() -> object:
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{devtools_port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        async with websockets.asyncio.client.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            await ws.send(
                json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
            )
            while True:
                message = json.loads(await ws.recv())
                if message.get("id") == 1:
                    return message["result"]["result"].get("value")

    return await (run() if netns is None else in_netns(netns, run))
