"""The demo provider: :mod:`browservm.guest.providers.demo_cli` signing in to :mod:`browservm.demo.oauth`.

Option ``issuer`` (required): the demo OAuth server's base URL, as the controller serves it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from browservm.guest.providers.base import (
    CredentialFiles,
    Prompt,
    Provider,
    json_file,
    require_strings,
    section,
    strings,
)

CREDENTIALS = ".browservm-demo/credentials.json"


class Demo(Provider):
    name = "demo"
    url_patterns = (re.compile(r"https?://\S+/authorize\?\S+"),)
    prompts = (Prompt(re.compile(r"Sign in to \S+\? \[Y/n\]"), "y\r"),)
    credential_files = (CREDENTIALS,)

    def __init__(self, options: Mapping[str, str]) -> None:
        super().__init__(options)
        issuer = self.options.get("issuer", "")
        if urlsplit(issuer).scheme not in ("http", "https"):
            raise ValueError(
                f"the demo provider needs option 'issuer', the demo OAuth server's http(s) URL; got {issuer!r}"
            )
        self.issuer = issuer

    def command(self, env: Mapping[str, str]) -> list[str]:
        # The guest image's own Python runs the demo CLI, as it runs the agent.
        return [
            sys.executable,
            "-m",
            "browservm.guest.providers.demo_cli",
            "login",
            "--issuer",
            self.issuer,
            "--confirm",
            # Waits past the login runner's own deadline, so a user who walks away ends the session
            # `expired` (the runner's verdict), not `failed` (the CLI giving up first).
            "--timeout",
            f"{float(env.get('BROWSERVM_LOGIN_TIMEOUT_S') or 600) + 30:g}",
        ]

    def env(self, home: Path) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1"}

    def validate(self, files: CredentialFiles, *, cli_exited: bool) -> None:
        credentials = json_file(files, CREDENTIALS)
        require_strings(credentials, CREDENTIALS, "access_token", "refresh_token")
        require_strings(section(credentials, "account"), CREDENTIALS, "email")

    def account(self, files: CredentialFiles) -> dict[str, str]:
        credentials = json_file(files, CREDENTIALS)
        account = section(credentials, "account")
        return strings(
            email=account.get("email"), account_id=account.get("sub"), issuer=credentials.get("issuer")
        )
