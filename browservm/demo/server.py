"""The demo OAuth server as the controller runs it: on a port of its own, on the loopback and on the
sandbox network's gateway, so that a guest's browser and demo CLI reach it the way real CLIs reach their
providers, while the controller's API stays out of a guest's reach."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator, Sequence

import structlog
import uvicorn
from fastapi import FastAPI

from browservm.demo.oauth import create_app

log = structlog.get_logger(__name__)

PATH = "/demo/oauth"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The controller's own server handles the process's signals; this one is stopped by it.
        yield


class DemoOAuthServer:
    def __init__(self, *, hosts: Sequence[str], port: int, issuer_host: str) -> None:
        self.hosts = list(hosts)
        self.port = port
        self.issuer = f"http://{issuer_host}:{port}{PATH}"
        """What a guest's demo CLI is told to sign in against."""
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sockets: list[socket.socket] = []
        for host in self.hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, self.port))
            except OSError as exc:
                sock.close()
                for opened in sockets:
                    opened.close()
                raise OSError(
                    f"the demo OAuth server cannot listen on {host}:{self.port} ({exc.strerror}); "
                    "set BROWSERVM_DEMO_OAUTH_PORT to a free port, or BROWSERVM_DEMO_OAUTH=false"
                ) from exc
            sock.listen(128)
            sockets.append(sock)
        app = _mounted(self.issuer)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=5)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=sockets), name="demo-oauth")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        log.info("demo_oauth.listening", issuer=self.issuer, hosts=self.hosts, port=self.port)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None


def _mounted(issuer: str) -> FastAPI:
    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    outer.mount(PATH, create_app(issuer))
    return outer
