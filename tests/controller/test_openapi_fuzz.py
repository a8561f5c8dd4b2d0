"""Schemathesis against the live controller's own OpenAPI document: no input may cause a server error
or an answer outside the documented schema."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.controller.conftest import controller_settings, run_controller

EXAMPLES = int(os.environ.get("BROWSERVM_FUZZ_EXAMPLES", "100"))


@pytest.mark.slow
async def test_no_request_produces_a_server_error(tmp_path: Path, database_url: str) -> None:
    # One sandbox slot and a long queue: fuzzed session creations wait in line instead of being refused,
    # so a 503 would be a real fault, not a full host.
    # No rate limit: a 429 would answer most of the fuzzer's requests before the routes see them.
    settings = controller_settings(
        tmp_path, database_url, max_sandboxes=1, max_queued_sessions=100_000, rate_limit_per_s=0
    )
    async with run_controller(settings) as controller:
        schemathesis = Path(sys.executable).parent / "schemathesis"
        process = await asyncio.create_subprocess_exec(
            str(schemathesis),
            "run",
            f"{controller.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {controller.key}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            str(EXAMPLES),
            "--exclude-path-regex",
            # Streams that stay open as long as their session lives; they are covered by their own tests.
            r".*/(events|signal|vnc)$",
            "--request-timeout",
            "20",
            "--seed",
            "1",
            "--suppress-health-check",
            "all",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=900)
        text = output.decode(errors="replace")
        assert process.returncode == 0, text[-6000:]
        # The controller is still up and answering after the run.
        async with httpx.AsyncClient(base_url=controller.url) as client:
            assert (await client.get("/healthz")).status_code == 200
        for session in (await controller.client.get("/v1/sessions", params={"limit": 200})).json()["data"]:
            if session["status"] not in ("completed", "failed", "expired", "cancelled"):
                await controller.client.post(f"/v1/sessions/{session['id']}/cancel")
