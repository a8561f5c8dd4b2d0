"""The client installs and imports without the server: httpx and pydantic are all it needs."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires


def _names(distribution: str) -> set[str]:
    """The names of what ``distribution`` requires (its extras' requirements included)."""
    return {re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0].lower() for r in requires(distribution) or []}


def test_the_client_distribution_requires_only_httpx_and_pydantic() -> None:
    assert _names("browservm-client") == {"httpx", "pydantic"}
    # The server depends on it (the API's models live there), not the other way round.
    assert "browservm-client" in _names("browservm")


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    probe = (
        "import sys, browservm_client, browservm_client.models\n"
        "server = ('browservm', 'fastapi', 'starlette', 'sqlalchemy', 'uvicorn', 'structlog', 'aiortc')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in server))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
