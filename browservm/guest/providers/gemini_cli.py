"""Google Gemini CLI (npm ``@google/gemini-cli``, tested with 0.61.0).

``gemini`` (interactive) with ``security.auth.selectedType = "oauth-personal"`` signs in with Google.
It opens a browser (through ``xdg-open``, which the runner's hook shadows, or ``$BROWSER``) with a
``127.0.0.1:<random port>`` callback only when ``DISPLAY`` is set and ``NO_BROWSER``, ``CI`` and
``DEBIAN_FRONTEND`` are not. Seen here: when the saved auth type starts the login before the terminal
UI is up, it fails with "Authentication consent could not be obtained" and shows the auth dialog;
Enter there ("Sign in with Google" is preselected) and Enter at "Do you want to continue?" start the
browser flow. The home folder is pre-trusted so no trust dialog (and restart) comes first.
Credentials: ``~/.gemini/oauth_creds.json`` (tokens), ``google_accounts.json`` (active account) and
the auth type in ``settings.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from browservm import protocol
from browservm.guest.files import merge_json
from browservm.guest.providers.base import (
    CredentialFiles,
    CredentialsIncomplete,
    Prompt,
    Provider,
    blob,
    json_file,
    jwt_claims,
    locate_cli,
    require_strings,
    strings,
)

OAUTH_CREDS = ".gemini/oauth_creds.json"
ACCOUNTS = ".gemini/google_accounts.json"
SETTINGS = ".gemini/settings.json"
TRUSTED_FOLDERS = ".gemini/trustedFolders.json"
AUTH_SETTINGS: dict[str, Any] = {"security": {"auth": {"selectedType": "oauth-personal"}}}


class GeminiCli(Provider):
    name = "gemini_cli"
    url_patterns = (re.compile(r"https://accounts\.google\.com/o/oauth2/v2/auth\?\S+"),)
    prompts = (
        Prompt(re.compile(r"Trust folder \("), "\r"),
        Prompt(re.compile(r"How would you like to authenticate"), "\r"),
        Prompt(re.compile(r"Do you want to continue\?"), "\r"),
    )
    credential_files = (OAUTH_CREDS, ACCOUNTS, SETTINGS)
    unset_env = ("NO_BROWSER", "CI", "GITHUB_ACTIONS", "DEBIAN_FRONTEND")

    def command(self, env: Mapping[str, str]) -> list[str]:
        return [locate_cli("gemini", env)]

    def prepare_home(self, home: Path) -> None:
        gemini = home / ".gemini"
        gemini.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings_path = home / SETTINGS
        try:
            settings = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            settings = {}
        settings = merge_json(settings if isinstance(settings, dict) else {}, AUTH_SETTINGS)
        settings_path.write_text(json.dumps(settings, indent=2))
        trusted_path = home / TRUSTED_FOLDERS
        try:
            trusted = json.loads(trusted_path.read_text())
        except (OSError, ValueError):
            trusted = {}
        trusted[str(home)] = "TRUST_FOLDER"
        trusted_path.write_text(json.dumps(trusted, indent=2))

    def validate(self, files: CredentialFiles, *, cli_exited: bool) -> None:
        require_strings(json_file(files, OAUTH_CREDS), OAUTH_CREDS, "access_token", "refresh_token")
        # The account is cached after the tokens; wait for it unless the CLI is gone.
        if not cli_exited:
            require_strings(json_file(files, ACCOUNTS), ACCOUNTS, "active")

    def account(self, files: CredentialFiles) -> dict[str, str]:
        claims = jwt_claims(json_file(files, OAUTH_CREDS).get("id_token"))
        try:
            active = json_file(files, ACCOUNTS).get("active")
        except CredentialsIncomplete:
            active = None
        return strings(email=active or claims.get("email"), account_id=claims.get("sub"))

    def delivery(self, files: CredentialFiles) -> list[protocol.FileBlob]:
        # settings.json travels as the auth type alone, merged into the user's own settings.
        blobs = [blob(OAUTH_CREDS, files[OAUTH_CREDS])]
        if ACCOUNTS in files:
            blobs.append(blob(ACCOUNTS, files[ACCOUNTS]))
        blobs.append(blob(SETTINGS, json.dumps(AUTH_SETTINGS, indent=2).encode(), merge="json"))
        return blobs
