"""Running a scenario driver (``tests/web/*_driver.py``) inside a test's network namespace.

A driver runs the whole product (controller, sandboxes, coturn, a Playwright viewer) as a separate
process in the namespace, writes what it saw step by step to a JSON file, and exits; the test module
asserts on those steps. A driver that stops early leaves the steps it finished and its error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER_TIMEOUT_S = 150


def run_driver(netns: str, module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m <module> --state-dir D --out F <args>`` in ``netns``; its results, with its exit
    status (``driver_exit``) and the tail of its log (``driver_log``). Killed after ``DRIVER_TIMEOUT_S``."""
    state_dir = Path(tempfile.mkdtemp(prefix="bvm-"))  # short: unix socket paths live under it
    out = state_dir.with_name(state_dir.name + "-results.json")
    log = state_dir.with_name(state_dir.name + "-driver.log")
    try:
        with log.open("wb") as log_file:
            driver = subprocess.Popen(
                [
                    "ip", "netns", "exec", netns, sys.executable, "-m", module,
                    "--state-dir", str(state_dir), "--out", str(out), *args,
                ],
                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                driver.wait(DRIVER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        data: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"steps_done": []}
        data["driver_exit"] = driver.returncode
        data["driver_log"] = log.read_text(errors="replace")[-6000:]
        return data
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        out.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def step(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The step's results, or a failure that says why the driver never got there."""
    if name not in results:
        error = results.get("error") or {}
        detail = json.dumps({k: v for k, v in error.items() if k != "traceback"}, indent=1)[-5000:]
        pytest.fail(
            f"the driver did not complete step {name!r} (done: {results['steps_done']}, exit "
            f"{results['driver_exit']}):\n{error.get('traceback', '')}\n{detail}\n{results['driver_log']}"
        )
    value: dict[str, Any] = results[name]
    return value
