"""All configuration, in one typed object built once at start-up and passed down.

Sources, highest first: ``BROWSERVM_*`` environment variables, then the TOML file named by
``BROWSERVM_CONFIG`` (if any), then the defaults below.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "browservm"


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the file named by ``BROWSERVM_CONFIG``: flat keys named like the fields."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("BROWSERVM_CONFIG")
        self._values: dict[str, Any] = {}
        if path:
            try:
                self._values = tomllib.loads(Path(path).read_text())
            except FileNotFoundError as exc:
                raise SettingsError(f"BROWSERVM_CONFIG: file {path} does not exist") from exc
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"BROWSERVM_CONFIG: {path} is not valid TOML: {exc}") from exc

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


class SettingsError(Exception):
    """A configuration value is wrong; the message names the variable and what it accepts."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROWSERVM_", extra="ignore", validate_default=True)

    # --- where and how it runs
    state_dir: Path = Field(default_factory=_default_state_dir)
    database_url: str = ""
    """Empty: SQLite in ``state_dir``. ``postgresql+asyncpg://user:pass@host/db`` in production."""
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    public_url: AnyHttpUrl | None = None
    """Base URL users reach the controller at (viewer links); default ``http://{host}:{port}``."""
    backend: Literal["process", "qemu", "firecracker"] = "process"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    # --- capacity and time
    max_sandboxes: int = Field(4, ge=1, le=1000)
    """Sandboxes (browser and CLI) this host runs at once; past it sessions queue, then get 429."""
    max_queued_sessions: int = Field(16, ge=0)
    session_ttl_s: float = Field(900.0, gt=0)
    """A session that has not completed by then ends ``expired``."""
    viewer_token_ttl_s: float = Field(900.0, gt=0)
    sandbox_boot_timeout_s: float = Field(60.0, gt=0)
    reconcile_interval_s: float = Field(15.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    warm_pool_size: int = Field(1, ge=0)
    """Browser sandboxes kept booted (browser and streamer running) for the next sessions; each holds a
    capacity slot and ~300 MB. 0 turns the pool off. Must be below ``max_sandboxes``; left at its
    default, it shrinks to fit (a one-sandbox host keeps no pool)."""

    # --- streaming and TURN
    screen_width: int = Field(1280, ge=320, le=3840)
    screen_height: int = Field(720, ge=240, le=2160)
    screen_fps: int = Field(30, ge=1, le=60)
    codec: Literal["h264", "vp8"] = "h264"
    stun_urls: list[str] = Field(default_factory=list)
    turn_urls: list[str] = Field(default_factory=list)
    """e.g. ``turn:turn.example.com:3478?transport=udp``; empty disables TURN."""
    turn_secret: str = ""
    """coturn ``static-auth-secret`` (``use-auth-secret``): credentials are HMAC-SHA1 over ``expiry:user``."""
    turn_ttl_s: int = Field(3600, ge=60)
    ice_host_addresses: list[str] = Field(default_factory=list)
    """Addresses guest streamers gather ICE host candidates on (``BROWSERVM_ICE_HOST_ADDRESSES``, JSON list);
    empty: every interface. Loopback-only test beds set ``["127.0.0.1"]`` (aioice skips 127.0.0.1 unless
    told), which also makes the streamer ignore non-loopback candidates and ICE servers."""
    run_coturn: bool = False
    """``browservm serve`` starts a local coturn with ``turn_secret`` (development and tests)."""
    devtools_debug_port: bool = False
    """Also open each sandbox Chromium's DevTools on a loopback port inside the sandbox (the agent itself
    uses a pipe). For debugging and tests: with the ``process`` backend that port is on the host's
    loopback, where anything local can drive the user's browser."""
    viewer_frame_ancestors: str = "*"
    """CSP ``frame-ancestors`` of the viewer page: who may embed it (``'self' https://app.example``)."""

    # --- secrets
    secret_key: str = ""
    """Signs viewer tokens. Empty: generated once into ``state_dir/controller.key``. Replicas must share it."""

    # --- credentials
    vault_key_file: Path | None = None
    """JSON ``{"active": "k1", "keys": {"k1": "<base64 32 bytes>"}}``; default ``state_dir/vault.json``."""
    vault_keys: str = ""
    """Same JSON as the key file, from the environment (wins over the file)."""

    # --- demo
    demo_oauth: bool = True
    """Serve the local OAuth authorization server the ``demo`` provider signs in against."""

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "must start with sqlite+aiosqlite:// or postgresql+asyncpg:// "
                "(e.g. postgresql+asyncpg://browservm:secret@127.0.0.1/browservm)"
            )
        return value

    @field_validator("ice_host_addresses")
    @classmethod
    def _ip_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f'{address!r} is not an IP address (e.g. ["127.0.0.1"])') from None
        return value

    @model_validator(mode="after")
    def _turn(self) -> Settings:
        if (self.turn_urls or self.run_coturn) and not self.turn_secret:
            raise ValueError(
                "BROWSERVM_TURN_SECRET is required when BROWSERVM_TURN_URLS or BROWSERVM_RUN_COTURN is set"
            )
        if self.run_coturn and not self.turn_urls:
            # The local coturn's own address, so viewers and guests get credentials for it.
            self.turn_urls = ["turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp"]
        return self

    @model_validator(mode="after")
    def _warm_pool(self) -> Settings:
        if "warm_pool_size" in self.model_fields_set and self.warm_pool_size >= self.max_sandboxes:
            raise ValueError(
                f"BROWSERVM_WARM_POOL_SIZE ({self.warm_pool_size}) must be below BROWSERVM_MAX_SANDBOXES "
                f"({self.max_sandboxes}): sessions and CLI VMs need slots of their own"
            )
        return self

    @property
    def effective_warm_pool_size(self) -> int:
        return min(self.warm_pool_size, self.max_sandboxes - 1)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.state_dir / 'browservm.db'}"

    @property
    def effective_public_url(self) -> str:
        if self.public_url is not None:
            return str(self.public_url).rstrip("/")
        return f"http://{self.host}:{self.port}"

    @property
    def effective_vault_key_file(self) -> Path:
        return self.vault_key_file or self.state_dir / "vault.json"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message that names each variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]) or "settings"
            variable = f"BROWSERVM_{name.upper()}" if error["loc"] else "configuration"
            lines.append(f"{variable}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
