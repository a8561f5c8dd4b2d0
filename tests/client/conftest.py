"""The client against a real controller (process sandboxes) on a loopback port, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from browservm_client import AsyncClient
from tests.controller.conftest import Controller, controller_settings, run_controller


@pytest.fixture
async def controller(tmp_path: Path, database_url: str) -> AsyncIterator[Controller]:
    # One sandbox at a time: these tests exercise the API, not the host's capacity.
    settings = controller_settings(tmp_path, database_url, max_sandboxes=1)
    async with run_controller(settings) as running:
        yield running


@pytest.fixture
def api(controller: Controller) -> AsyncClient:
    return controller.api
