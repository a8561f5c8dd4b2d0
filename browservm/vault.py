"""Sealing and opening credentials: AES-256-GCM under a key ring with one active key.

Each record is sealed under the ring's active key with a fresh random 96-bit nonce, and carries the id
of its key so that it still opens after rotation. The associated data binds a record to its
``(user_id, provider)`` pair and key id: a ciphertext copied onto another user's row, or relabelled with
another key id, fails to open instead of decrypting into the wrong account.

The key ring is JSON ``{"active": "k2", "keys": {"k1": "<base64 of 32 bytes>", "k2": "..."}}``, taken
from ``settings.vault_keys`` (an environment string) or else ``settings.effective_vault_key_file``.
:meth:`Vault.from_settings` creates that file (mode 600) with one random key when neither exists.

Rotation: add a new key, make it active (:meth:`KeyRing.rotated`, :func:`write_key_file`), restart; old
records still open, :meth:`Vault.needs_reseal` tells which ones to :meth:`Vault.reseal` under the new key.
Remove an old key only once no record uses it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from browservm.settings import Settings

KEY_BYTES = 32
NONCE_BYTES = 12
_AD_LABEL = "browservm-vault-v1"


class VaultError(Exception):
    """A record cannot be sealed or opened, or the key ring is unusable.

    Messages name the key id, user and provider involved and what to do; never key bytes or plaintext.
    """


@dataclass(frozen=True, slots=True)
class Sealed:
    """One sealed record, as the store keeps it (three columns)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The vault's keys by id, and which one seals new records."""

    active: str
    keys: dict[str, bytes]

    def __post_init__(self) -> None:
        if not self.keys:
            raise VaultError("the vault key ring has no keys; add one (e.g. `browservm keys create`)")
        if self.active not in self.keys:
            raise VaultError(
                f"the vault's active key {self.active!r} is not among its keys ({', '.join(sorted(self.keys))})"
            )
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise VaultError(
                    f"vault key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES} (base64 of 32 random bytes)"
                )

    @classmethod
    def generate(cls, key_id: str = "k1") -> KeyRing:
        return cls(active=key_id, keys={key_id: secrets.token_bytes(KEY_BYTES)})

    @classmethod
    def from_json(cls, text: str, *, source: str) -> KeyRing:
        """Parse the key ring JSON; ``source`` names where it came from, for the error message."""
        try:
            raw = json.loads(text)
            active = raw["active"]
            encoded = raw["keys"]
            if not isinstance(active, str) or not isinstance(encoded, dict):
                raise TypeError("wrong types")
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in encoded.items()}
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise VaultError(
                f'{source}: not a vault key ring; expected {{"active": "k1", "keys": {{"k1": "<base64 of 32 bytes>"}}}}'
                f" ({type(exc).__name__})"
            ) from None
        return cls(active=active, keys=keys)

    def to_json(self) -> str:
        keys = {k: base64.b64encode(v).decode() for k, v in self.keys.items()}
        return json.dumps({"active": self.active, "keys": keys}, indent=2)

    def rotated(self, key_id: str | None = None) -> KeyRing:
        """A ring with one more random key, made active; the old keys stay so old records open."""
        if key_id is None:
            number = len(self.keys) + 1
            while f"k{number}" in self.keys:
                number += 1
            key_id = f"k{number}"
        if key_id in self.keys:
            raise VaultError(f"vault key id {key_id!r} already exists; choose a new id")
        return KeyRing(active=key_id, keys={**self.keys, key_id: secrets.token_bytes(KEY_BYTES)})


def write_key_file(path: Path, ring: KeyRing, *, replace: bool = True) -> None:
    """Write the key ring atomically with mode 600: a temp file in the same directory, then renamed.

    With ``replace=False`` an existing file is left alone and :class:`FileExistsError` raised, so two
    first starts racing never overwrite each other's key.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(ring.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name exists
    finally:
        Path(tmp).unlink(missing_ok=True)


def _associated_data(key_id: str, user_id: str, provider: str) -> bytes:
    # JSON of a list is unambiguous whatever characters the ids hold, unlike plain concatenation.
    return json.dumps([_AD_LABEL, key_id, user_id, provider]).encode()


class Vault:
    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        self._ciphers = {key_id: AESGCM(key) for key_id, key in ring.keys.items()}

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        """The vault of these settings: ``vault_keys`` if set, else the key file, created if missing."""
        if settings.vault_keys:
            return cls(KeyRing.from_json(settings.vault_keys, source="BROWSERVM_VAULT_KEYS"))
        path = settings.effective_vault_key_file
        try:
            return cls(KeyRing.from_json(path.read_text(), source=str(path)))
        except FileNotFoundError:
            pass
        ring = KeyRing.generate()
        try:
            write_key_file(path, ring, replace=False)
        except FileExistsError:
            return cls(KeyRing.from_json(path.read_text(), source=str(path)))
        return cls(ring)

    @property
    def active_key_id(self) -> str:
        return self._ring.active

    def seal(self, plaintext: bytes, *, user_id: str, provider: str) -> Sealed:
        key_id = self._ring.active
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = self._ciphers[key_id].encrypt(
            nonce, plaintext, _associated_data(key_id, user_id, provider)
        )
        return Sealed(key_id=key_id, nonce=nonce, ciphertext=ciphertext)

    def open(self, sealed: Sealed, *, user_id: str, provider: str) -> bytes:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise VaultError(
                f"credentials of user {user_id!r} ({provider}) are sealed under vault key {sealed.key_id!r}, "
                f"which this vault does not have (it has {', '.join(sorted(self._ciphers))}); "
                "restore that key to the key ring"
            )
        if len(sealed.nonce) != NONCE_BYTES:
            raise VaultError(
                f"credentials of user {user_id!r} ({provider}) have a {len(sealed.nonce)}-byte nonce, "
                f"not {NONCE_BYTES}: the record is damaged; sign in again"
            )
        try:
            return cipher.decrypt(
                sealed.nonce, sealed.ciphertext, _associated_data(sealed.key_id, user_id, provider)
            )
        except InvalidTag:
            raise VaultError(
                f"credentials of user {user_id!r} ({provider}) under key {sealed.key_id!r} do not open: "
                "the record was altered or belongs to another user or provider; sign in again"
            ) from None

    def needs_reseal(self, sealed: Sealed) -> bool:
        """True when the record is sealed under a key other than the active one."""
        return sealed.key_id != self._ring.active

    def reseal(self, sealed: Sealed, *, user_id: str, provider: str) -> Sealed:
        """The same plaintext sealed under the active key (a fresh nonce); unchanged if already there."""
        if not self.needs_reseal(sealed):
            return sealed
        return self.seal(
            self.open(sealed, user_id=user_id, provider=provider), user_id=user_id, provider=provider
        )
