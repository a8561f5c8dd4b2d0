"""The browser image's tree as a sandbox's root: the agent brings up Xvfb, Chromium, x11vnc and the
streamer from the image alone (its python3, its Chromium, its pixelflux), as uid 1000.

Runs when the current browser image is this checkout's (``browservm image build``, which
``scripts/run.sh`` does); CI builds only the minimal one, so there it skips.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm import protocol
from browservm.sandbox.channel import Channel
from browservm.sandbox.image import BuiltImage, Recipe, store_for
from browservm.settings import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def browser_image() -> BuiltImage:
    image = store_for(load_settings()).current("browser")
    if image is None:
        pytest.skip("no browser image built (browservm image build)")
    if image.key != Recipe("browser").image_key():
        # Its agent would not be this checkout's: what failed would say nothing about this code.
        pytest.skip(f"{image.path.name} is not this checkout's recipe (browservm image build)")
    return image


@pytest.fixture
async def agent_channel(browser_image: BuiltImage) -> AsyncIterator[Channel]:
    agent = browser_image.manifest.agent
    sandbox = Path(tempfile.mkdtemp(prefix="bvm-imgb-", dir="/tmp"))  # short: unix socket paths
    (sandbox / "home").mkdir()
    (sandbox / "run").mkdir()
    command = ["bwrap", "--ro-bind", str(browser_image.tree), "/", "--proc", "/proc", "--dev", "/dev",
               "--tmpfs", "/tmp", "--tmpfs", "/run", "--bind", str(sandbox / "home"), agent.home,
               "--bind", str(sandbox / "run"), agent.run_dir, "--unshare-all", "--uid", str(agent.uid),
               "--gid", str(agent.gid), "--die-with-parent", "--new-session", "--chdir", agent.home, "--clearenv"]  # fmt: skip
    for name, value in agent.env.items():
        command += ["--setenv", name, value]
    command += ["--", *agent.command("imgb", "browser", f"unix:{agent.run_dir}/agent.sock")]
    log = (sandbox / "agent.log").open("wb")
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sandbox / "run/agent.sock"))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert process.returncode is None, (sandbox / "agent.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the agent did not listen within 60 s"
                await asyncio.sleep(0.1)
        channel = await asyncio.wait_for(Channel.handshake("imgb", reader, writer), 30)
        try:
            yield channel
        finally:
            await channel.close()
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)
        log.close()
        shutil.rmtree(sandbox, ignore_errors=True)


async def test_the_browser_tree_runs_every_service_of_a_session(agent_channel: Channel) -> None:
    async with agent_channel.subscribe() as events:
        reply = await agent_channel.request(
            protocol.Configure(
                session_id="s1",
                start_url="data:text/html,<title>from the image</title>",
                screen=protocol.ScreenConfig(width=800, height=600, fps=5),
            )
        )
        wanted = set(reply.services)
        assert wanted == {"xvfb", "chromium", "vnc", "streamer"}
        ready: set[str] = set()
        async with asyncio.timeout(120):
            while ready != wanted:
                event = await events.get()
                if isinstance(event, protocol.ServiceState):
                    assert event.state != "failed", f"{event.service}: {event.detail}"
                    if event.state == "ready":
                        ready.add(event.service)
