"""The demo OAuth server on a real loopback port, for tests (uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from browservm.demo.oauth import create_app


@contextmanager
def demo_oauth_server(
    users: dict[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve the demo OAuth server on ``host`` (a free port unless given); yields its issuer URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)  # listening before uvicorn runs: clients can connect at once
    issuer = f"http://{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(issuer, users=users), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
