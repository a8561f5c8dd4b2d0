"""OpenAI Codex CLI (npm ``@openai/codex``, tested with 0.169.0).

``codex login -c cli_auth_credentials_store="file"`` with ``CODEX_HOME=~/.codex`` serves its callback on
``localhost:1455`` (1457 if taken) and writes ``~/.codex/auth.json``. Its refresh tokens are single use
and a logout anywhere revokes them everywhere: the runner stops it the moment the file is complete and
never logs out (openai/codex#9634, #23781).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from browservm.guest.providers.base import (
    CredentialFiles,
    Provider,
    json_file,
    jwt_claims,
    locate_cli,
    require_strings,
    section,
    strings,
)

AUTH = ".codex/auth.json"


class Codex(Provider):
    name = "codex"
    url_patterns = (re.compile(r"https://auth\.openai\.com/oauth/authorize\?\S+"),)
    credential_files = (AUTH,)

    def command(self, env: Mapping[str, str]) -> list[str]:
        # File storage pinned: the keyring would keep the tokens out of reach of the delivery.
        return [locate_cli("codex", env), "login", "-c", 'cli_auth_credentials_store="file"']

    def env(self, home: Path) -> dict[str, str]:
        return {"CODEX_HOME": str(home / ".codex")}

    def prepare_home(self, home: Path) -> None:
        (home / ".codex").mkdir(mode=0o700, parents=True, exist_ok=True)

    def validate(self, files: CredentialFiles, *, cli_exited: bool) -> None:
        tokens = section(json_file(files, AUTH), "tokens")
        require_strings(tokens, AUTH, "access_token", "refresh_token")

    def account(self, files: CredentialFiles) -> dict[str, str]:
        auth = json_file(files, AUTH)
        tokens = section(auth, "tokens")
        claims = jwt_claims(tokens.get("id_token"))
        openai = section(claims, "https://api.openai.com/auth")
        return strings(
            email=claims.get("email"),
            account_id=tokens.get("account_id") or openai.get("chatgpt_account_id"),
            plan=openai.get("chatgpt_plan_type"),
            auth_mode=auth.get("auth_mode"),
        )
