"""The command line as an operator uses it: real processes, a real database in a temp state dir."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from browservm.settings import Settings
from browservm.store import credentials
from browservm.store.database import Database
from browservm.vault import Sealed, Vault

BIN = Path(sys.executable).parent / "browservm"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, timeout=60)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "BROWSERVM_STATE_DIR": str(tmp_path / "state"), **extra}


def test_keys_create_prints_the_key_alone_and_list_never_shows_it(tmp_path: Path) -> None:
    env = _env(tmp_path)
    created = _run(env, "keys", "create", "--name", "ci")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("bvm_") and "\n" not in secret and len(secret) > 40
    listed = _run(env, "keys", "list")
    assert "ci" in listed.stdout and secret not in listed.stdout
    key_id = listed.stdout.split()[0]
    assert _run(env, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in _run(env, "keys", "list").stdout
    missing = _run(env, "keys", "revoke", "key_nope")
    assert missing.returncode == 1 and "keys list" in missing.stderr


def test_a_wrong_setting_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    for variable, value in [
        ("BROWSERVM_PORT", "eighty"),
        ("BROWSERVM_BACKEND", "docker"),
        ("BROWSERVM_DATABASE_URL", "mysql://x"),
        ("BROWSERVM_MAX_SANDBOXES", "0"),
    ]:
        result = _run(_env(tmp_path, **{variable: value}), "serve")
        assert result.returncode == 2, (variable, result.stderr)
        assert variable in result.stderr, result.stderr
    config = tmp_path / "browservm.toml"
    config.write_text("port = [1]\n")
    result = _run(_env(tmp_path, BROWSERVM_CONFIG=str(config)), "serve")
    assert result.returncode == 2 and "BROWSERVM_PORT" in result.stderr
    result = _run(_env(tmp_path, BROWSERVM_CONFIG=str(tmp_path / "absent.toml")), "serve")
    assert result.returncode == 2 and "BROWSERVM_CONFIG" in result.stderr


def test_config_file_values_apply_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "browservm.toml"
    config.write_text('port = 9123\nhost = "127.0.0.2"\n')
    os.environ["BROWSERVM_CONFIG"] = str(config)
    os.environ["BROWSERVM_PORT"] = "9124"
    try:
        settings = Settings()
    finally:
        del os.environ["BROWSERVM_CONFIG"], os.environ["BROWSERVM_PORT"]
    assert settings.host == "127.0.0.2" and settings.port == 9124


def test_vault_rotate_reseals_stored_credentials_under_the_new_key(tmp_path: Path) -> None:
    env = _env(tmp_path)
    settings = Settings(state_dir=tmp_path / "state")
    vault = Vault.from_settings(settings)
    sealed = vault.seal(b'{"token": "s3cret"}', user_id="alice", provider="demo")

    async def store() -> None:
        db = Database(settings.effective_database_url)
        await db.migrate()
        async with db.session() as s:
            await credentials.add(
                s,
                tenant="default",
                user_id="alice",
                provider="demo",
                session_id=None,
                account={},
                key_id=sealed.key_id,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
            )
        await db.close()

    asyncio.run(store())
    rotated = _run(env, "vault", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "re-sealed 1 of 1" in rotated.stdout

    async def load() -> Sealed:
        db = Database(settings.effective_database_url)
        async with db.session() as s:
            (record,) = await credentials.live_sealed(s)
        await db.close()
        return Sealed(key_id=record.key_id, nonce=record.nonce, ciphertext=record.ciphertext)

    fresh = asyncio.run(load())
    assert fresh.key_id != sealed.key_id
    assert (
        Vault.from_settings(settings).open(fresh, user_id="alice", provider="demo") == b'{"token": "s3cret"}'
    )
