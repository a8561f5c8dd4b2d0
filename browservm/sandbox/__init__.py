"""Sandboxes: one interface (:mod:`browservm.sandbox.base`), several backends."""

from __future__ import annotations

import os
from pathlib import Path

from browservm.sandbox.base import SandboxBackend
from browservm.settings import Settings, SettingsError


def make_backend(settings: Settings) -> SandboxBackend:
    if settings.backend == "process":
        from browservm.sandbox.process import ProcessBackend

        secrets = [settings.effective_vault_key_file]
        if config := os.environ.get("BROWSERVM_CONFIG"):
            secrets.append(Path(config))
        return ProcessBackend(settings.state_dir, hidden=secrets)
    raise SettingsError(
        f"BROWSERVM_BACKEND={settings.backend}: this backend is not built yet (it arrives with the microVM "
        "issue); use BROWSERVM_BACKEND=process"
    )
