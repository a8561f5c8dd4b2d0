"""What each provider makes of credential files shaped like the real CLIs' (from their sources)."""

import base64
import json
from pathlib import Path

import pytest

from browservm import protocol
from browservm.guest.providers import PROVIDERS, CredentialsIncomplete, get_provider
from browservm.guest.providers.base import CliNotInstalled, locate_cli


def jwt(claims: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


def content(blobs: list[protocol.FileBlob]) -> dict[str, object]:
    return {b.path: json.loads(base64.b64decode(b.content_b64)) for b in blobs}


def test_registry_matches_the_protocol() -> None:
    assert sorted(PROVIDERS) == sorted(protocol.PROVIDERS)


def test_codex_reads_tokens_and_account_from_auth_json() -> None:
    codex = get_provider("codex", {})
    id_token = jwt(
        {
            "email": "ada@example.com",
            "https://api.openai.com/auth": {"chatgpt_plan_type": "plus", "chatgpt_account_id": "acc-1"},
        }
    )
    auth = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {"id_token": id_token, "access_token": "at", "refresh_token": "rt", "account_id": "acc-1"},
        "last_refresh": "2026-11-24T12:00:00Z",
    }
    with pytest.raises(CredentialsIncomplete, match="does not exist yet"):
        codex.validate({}, cli_exited=False)
    with pytest.raises(CredentialsIncomplete, match="not complete JSON"):
        codex.validate({".codex/auth.json": b'{"tokens": {"acc'}, cli_exited=False)
    with pytest.raises(CredentialsIncomplete, match="refresh_token"):
        codex.validate(
            {".codex/auth.json": json.dumps({"tokens": {"access_token": "at"}}).encode()}, cli_exited=True
        )
    files = {".codex/auth.json": json.dumps(auth).encode()}
    codex.validate(files, cli_exited=False)
    assert codex.account(files) == {
        "email": "ada@example.com",
        "account_id": "acc-1",
        "plan": "plus",
        "auth_mode": "chatgpt",
    }
    blobs = codex.delivery(files)
    assert [(b.path, b.mode) for b in blobs] == [(".codex/auth.json", 0o600)]


def test_claude_waits_for_the_account_and_delivers_onboarding_done() -> None:
    claude = get_provider("claude_code", {})
    credentials = {
        "claudeAiOauth": {
            "accessToken": "sk-ant-oat01-x",
            "refreshToken": "sk-ant-ort01-y",
            "expiresAt": 1795522079638,
            "scopes": ["user:inference"],
            "subscriptionType": "max",
        }
    }
    config_before = {"firstStartTime": "2026-11-24", "projects": {"/home/u": {}}, "userID": "abc"}
    account = {"emailAddress": "ada@example.com", "accountUuid": "uuid-1", "organizationName": "Ada's Org"}
    files = {
        ".claude/.credentials.json": json.dumps(credentials).encode(),
        ".claude.json": json.dumps(config_before).encode(),
    }
    with pytest.raises(CredentialsIncomplete, match="oauthAccount"):
        claude.validate(files, cli_exited=False)
    claude.validate(files, cli_exited=True)  # the CLI is gone: the tokens are what there is
    files[".claude.json"] = json.dumps({**config_before, "oauthAccount": account}).encode()
    claude.validate(files, cli_exited=False)
    assert claude.account(files) == {
        "email": "ada@example.com",
        "account_id": "uuid-1",
        "organization": "Ada's Org",
        "plan": "max",
    }
    delivered = content(claude.delivery(files))
    assert delivered[".claude/.credentials.json"] == credentials
    assert delivered[".claude.json"] == {"hasCompletedOnboarding": True, "oauthAccount": account}
    merges = {b.path: b.merge for b in claude.delivery(files)}
    assert merges == {".claude/.credentials.json": "replace", ".claude.json": "json"}, (
        "the user's config stays"
    )


def test_claude_passes_the_email_option_to_the_login_page(tmp_path: Path) -> None:
    claude = get_provider("claude_code", {"email": "ada@example.com"})
    fake_bin = tmp_path / "node_modules" / ".bin"
    fake_bin.mkdir(parents=True)
    (fake_bin / "claude").write_text("#!/bin/sh\n")
    (fake_bin / "claude").chmod(0o755)
    argv = claude.command({"BROWSERVM_CLI_DIR": str(tmp_path)})
    assert argv == [str(fake_bin / "claude"), "auth", "login", "--claudeai", "--email", "ada@example.com"]


def test_gemini_prepares_settings_and_delivers_auth_type_only(tmp_path: Path) -> None:
    gemini = get_provider("gemini_cli", {})
    (tmp_path / ".gemini").mkdir()
    (tmp_path / ".gemini/settings.json").write_text(json.dumps({"ui": {"theme": "GitHub"}}))
    gemini.prepare_home(tmp_path)
    settings = json.loads((tmp_path / ".gemini/settings.json").read_text())
    assert settings == {"ui": {"theme": "GitHub"}, "security": {"auth": {"selectedType": "oauth-personal"}}}
    trusted = json.loads((tmp_path / ".gemini/trustedFolders.json").read_text())
    assert trusted == {str(tmp_path): "TRUST_FOLDER"}

    creds = {
        "access_token": "ya29.a",
        "refresh_token": "1//r",
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "token_type": "Bearer",
        "id_token": jwt({"email": "ada@example.com", "sub": "1234"}),
        "expiry_date": 1795522079638,
    }
    files = {
        ".gemini/oauth_creds.json": json.dumps(creds).encode(),
        ".gemini/settings.json": json.dumps(settings).encode(),
    }
    with pytest.raises(CredentialsIncomplete, match=r"google_accounts\.json"):
        gemini.validate(files, cli_exited=False)
    files[".gemini/google_accounts.json"] = json.dumps({"active": "ada@example.com", "old": []}).encode()
    gemini.validate(files, cli_exited=False)
    assert gemini.account(files) == {"email": "ada@example.com", "account_id": "1234"}
    delivered = content(gemini.delivery(files))
    assert delivered == {
        ".gemini/oauth_creds.json": creds,
        ".gemini/google_accounts.json": {"active": "ada@example.com", "old": []},
        ".gemini/settings.json": {"security": {"auth": {"selectedType": "oauth-personal"}}},
    }
    assert {b.path: b.merge for b in gemini.delivery(files)}[".gemini/settings.json"] == "json"


@pytest.mark.parametrize(
    ("provider", "url", "accepted"),
    [
        (
            "claude_code",
            "https://claude.com/cai/oauth/authorize?code=true&client_id=c&redirect_uri=http%3A%2F%2Flocalhost%3A36515%2Fcallback",
            True,
        ),
        (
            "claude_code",
            "https://claude.com/cai/oauth/authorize?code=true&client_id=c&redirect_uri=https%3A%2F%2Fplatform.claude.com%2Foauth%2Fcode%2Fcallback",
            False,
        ),
        (
            "gemini_cli",
            "https://accounts.google.com/o/oauth2/v2/auth?redirect_uri=http%3A%2F%2F127.0.0.1%3A38245%2Foauth2callback&access_type=offline",
            False,
        ),
        (
            "gemini_cli",
            "https://accounts.google.com/o/oauth2/v2/auth?redirect_uri=http%3A%2F%2F127.0.0.1%3A38245%2Foauth2callback&client_id=x",
            True,
        ),
        (
            "codex",
            "https://auth.openai.com/oauth/authorize?client_id=app&redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fauth%2Fcallback",
            True,
        ),
    ],
)
def test_only_complete_urls_with_a_loopback_callback_are_opened(
    provider: str, url: str, accepted: bool
) -> None:
    assert get_provider(provider, {}).accepts_url(url) is accepted


def test_missing_cli_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(CliNotInstalled, match=r"run scripts/install-clis\.sh"):
        locate_cli("no-such-cli", {"BROWSERVM_CLI_DIR": str(tmp_path), "PATH": str(tmp_path)})
