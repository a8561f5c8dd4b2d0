import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from browservm.settings import Settings
from browservm.vault import KeyRing, Sealed, Vault, VaultError, write_key_file

SECRET = b'{"tokens": {"refresh_token": "rt-very-secret"}}'


@pytest.fixture
def vault() -> Vault:
    return Vault(KeyRing.generate())


def test_round_trip(vault: Vault) -> None:
    sealed = vault.seal(SECRET, user_id="u1", provider="codex")
    assert sealed.key_id == "k1"
    assert len(sealed.nonce) == 12
    assert b"rt-very-secret" not in sealed.ciphertext
    assert vault.open(sealed, user_id="u1", provider="codex") == SECRET


def test_each_seal_uses_a_fresh_nonce(vault: Vault) -> None:
    first = vault.seal(SECRET, user_id="u1", provider="codex")
    second = vault.seal(SECRET, user_id="u1", provider="codex")
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext


def test_tampered_ciphertext_does_not_open(vault: Vault) -> None:
    sealed = vault.seal(SECRET, user_id="u1", provider="codex")
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(VaultError, match="altered or belongs to another user") as info:
        vault.open(replace(sealed, ciphertext=flipped), user_id="u1", provider="codex")
    assert "rt-very-secret" not in str(info.value)


def test_record_moved_to_another_user_or_provider_does_not_open(vault: Vault) -> None:
    sealed = vault.seal(SECRET, user_id="u1", provider="codex")
    with pytest.raises(VaultError, match="'u2'"):
        vault.open(sealed, user_id="u2", provider="codex")
    with pytest.raises(VaultError, match="gemini_cli"):
        vault.open(sealed, user_id="u1", provider="gemini_cli")


def test_unknown_key_id_names_the_key_and_what_to_do(vault: Vault) -> None:
    sealed = vault.seal(SECRET, user_id="u1", provider="codex")
    with pytest.raises(VaultError) as info:
        vault.open(replace(sealed, key_id="k9"), user_id="u1", provider="codex")
    message = str(info.value)
    assert "'k9'" in message
    assert "restore that key" in message


def test_relabelled_key_id_does_not_open() -> None:
    ring = KeyRing.generate().rotated()
    vault = Vault(ring)
    sealed = vault.seal(SECRET, user_id="u1", provider="codex")
    # Same key bytes under another id would still fail: the key id is part of the associated data.
    twin = Vault(KeyRing(active="k2", keys={"k2": ring.keys["k2"], "k3": ring.keys["k2"]}))
    with pytest.raises(VaultError):
        twin.open(Sealed("k3", sealed.nonce, sealed.ciphertext), user_id="u1", provider="codex")


def test_rotation_keeps_old_records_open_and_reseals_them() -> None:
    old_ring = KeyRing.generate()
    old = Vault(old_ring).seal(SECRET, user_id="u1", provider="claude_code")
    new_ring = old_ring.rotated()
    assert new_ring.active == "k2"
    vault = Vault(new_ring)
    assert vault.needs_reseal(old)
    assert vault.open(old, user_id="u1", provider="claude_code") == SECRET
    resealed = vault.reseal(old, user_id="u1", provider="claude_code")
    assert resealed.key_id == "k2"
    assert not vault.needs_reseal(resealed)
    assert vault.open(resealed, user_id="u1", provider="claude_code") == SECRET
    assert vault.reseal(resealed, user_id="u1", provider="claude_code") is resealed
    # Once the old key is gone, only the resealed record opens.
    only_new = Vault(KeyRing(active="k2", keys={"k2": new_ring.keys["k2"]}))
    assert only_new.open(resealed, user_id="u1", provider="claude_code") == SECRET
    with pytest.raises(VaultError, match="'k1'"):
        only_new.open(old, user_id="u1", provider="claude_code")


def test_from_settings_creates_a_private_key_file_once(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    vault = Vault.from_settings(settings)
    key_file = settings.effective_vault_key_file
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ring = json.loads(key_file.read_text())
    assert ring["active"] == "k1"
    sealed = vault.seal(SECRET, user_id="u1", provider="demo")
    # A restart reads the same file: the record still opens, the file is not rewritten.
    before = key_file.read_bytes()
    assert Vault.from_settings(settings).open(sealed, user_id="u1", provider="demo") == SECRET
    assert key_file.read_bytes() == before
    assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]


def test_vault_keys_from_environment_string_win_over_the_file(tmp_path: Path) -> None:
    ring = KeyRing.generate("env1")
    settings = Settings(state_dir=tmp_path, vault_keys=ring.to_json())
    vault = Vault.from_settings(settings)
    assert vault.active_key_id == "env1"
    assert not settings.effective_vault_key_file.exists()


def test_rotated_key_file_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "vault.json"
    write_key_file(path, KeyRing.generate())
    rotated = KeyRing.from_json(path.read_text(), source=str(path)).rotated()
    write_key_file(path, rotated)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyRing.from_json(path.read_text(), source=str(path)).active == "k2"
    with pytest.raises(FileExistsError):
        write_key_file(path, KeyRing.generate(), replace=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", "not a vault key ring"),
        ('{"active": "k2", "keys": {"k1": "AAAA"}}', "not among its keys"),
        ('{"active": "k1", "keys": {"k1": "AAAA"}}', "is 3 bytes"),
        ('{"active": "k1", "keys": {}}', "has no keys"),
    ],
)
def test_bad_key_rings_say_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(VaultError, match=expected):
        KeyRing.from_json(text, source="BROWSERVM_VAULT_KEYS")
