"""Fixtures for the sandbox backends: a short state directory and a process backend that leaves nothing."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from browservm.sandbox.process import ProcessBackend
from tests.support.image import image_tree
from tests.support.network import BackendNetwork


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short on purpose: the channel socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="bvm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def backend(state_dir: Path) -> AsyncIterator[ProcessBackend]:
    backend = ProcessBackend(state_dir, image_tree())
    yield backend
    # Whatever a test left running goes, found the way the reconciler would find it.
    for sandbox_id in await backend.list_orphans([]):
        await backend.destroy_orphan(sandbox_id)
    await backend.close()


@pytest.fixture
async def network(state_dir: Path) -> AsyncIterator[BackendNetwork]:
    net = BackendNetwork(state_dir)
    await net.network.ensure_host()
    try:
        yield net
    finally:
        await net.remove()


@pytest.fixture
def web_pages(network: BackendNetwork, tmp_path: Path) -> Iterator[str]:
    """A local site with two pages on the gateway (where guests may reach it), as a session's 'start_url'."""
    (tmp_path / "start.html").write_text("<title>start page</title><h1>hello from the test</h1>")
    (tmp_path / "next.html").write_text("<title>next page</title><h1>second</h1>")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer((network.gateway, network.web_port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{network.gateway}:{network.web_port}"
    server.shutdown()
    server.server_close()
