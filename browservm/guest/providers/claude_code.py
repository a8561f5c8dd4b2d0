"""Anthropic Claude Code (npm ``@anthropic-ai/claude-code``, tested with 2.1.328).

``claude auth login --claudeai`` hands ``$BROWSER`` an authorize URL with a ``localhost:<random port>``
callback, and prints a paste-the-code variant (redirect to platform.claude.com) as an OSC 8 hyperlink;
only the loopback one is opened. Tokens land in ``~/.claude/.credentials.json``, the account in
``~/.claude.json`` (``oauthAccount``). The CLI user's home also needs ``hasCompletedOnboarding: true``
there, or interactive ``claude`` shows its login wizard despite valid credentials
(anthropics/claude-code#8938).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from browservm import protocol
from browservm.guest.providers.base import (
    CredentialFiles,
    CredentialsIncomplete,
    Provider,
    blob,
    json_file,
    locate_cli,
    require_strings,
    section,
    strings,
)

CREDENTIALS = ".claude/.credentials.json"
CONFIG = ".claude.json"


class ClaudeCode(Provider):
    name = "claude_code"
    url_patterns = (re.compile(r"https://claude\.(?:ai|com)/\S*oauth/authorize\?\S+"),)
    credential_files = (CREDENTIALS, CONFIG)

    def command(self, env: Mapping[str, str]) -> list[str]:
        argv = [locate_cli("claude", env), "auth", "login", "--claudeai"]
        if self.options.get("email"):
            argv += ["--email", self.options["email"]]
        return argv

    def env(self, home: Path) -> dict[str, str]:
        # Nothing but the login talks to the network from the browser sandbox.
        return {"DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1"}

    def validate(self, files: CredentialFiles, *, cli_exited: bool) -> None:
        oauth = section(json_file(files, CREDENTIALS), "claudeAiOauth")
        require_strings(oauth, CREDENTIALS, "accessToken", "refreshToken")
        # The account is written after the tokens; wait for it unless the CLI is gone.
        if not cli_exited and not section(json_file(files, CONFIG), "oauthAccount"):
            raise CredentialsIncomplete(f"{CONFIG} has no oauthAccount yet")

    def account(self, files: CredentialFiles) -> dict[str, str]:
        oauth = section(json_file(files, CREDENTIALS), "claudeAiOauth")
        try:
            account = section(json_file(files, CONFIG), "oauthAccount")
        except CredentialsIncomplete:
            account = {}
        return strings(
            email=account.get("emailAddress"),
            account_id=account.get("accountUuid"),
            organization=account.get("organizationName"),
            plan=oauth.get("subscriptionType"),
        )

    def delivery(self, files: CredentialFiles) -> list[protocol.FileBlob]:
        # Only the account and the onboarding flag travel, merged into the CLI machine's ~/.claude.json:
        # the rest of the file describes this browser sandbox, and the user's own (MCP servers,
        # projects) stays as it is.
        try:
            account = section(json_file(files, CONFIG), "oauthAccount")
        except CredentialsIncomplete:
            account = {}
        config: dict[str, object] = {"hasCompletedOnboarding": True}
        if account:
            config["oauthAccount"] = account
        return [
            blob(CREDENTIALS, files[CREDENTIALS]),
            blob(CONFIG, json.dumps(config, indent=2).encode(), merge="json"),
        ]
