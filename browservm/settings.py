"""All configuration, in one typed object built once at start-up and passed down.

Sources, highest first: ``BROWSERVM_*`` environment variables, then the TOML file named by
``BROWSERVM_CONFIG`` (if any), then the defaults below.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import string
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from browservm.protocol.messages import PROVIDERS


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "browservm"


def _host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's DNS servers a guest can use: those of /etc/resolv.conf that are not on the host's own
    loopback (a guest's 127.0.0.1 is its own)."""
    servers = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(fields[1])
                    if address.version == 4 and not address.is_loopback:
                        servers.append(str(address))
    return servers


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
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


EgressPolicy = Literal["proxy", "direct", "proxy-then-direct"]
"""How a provider's sessions leave the host: only through the user's proxy; straight out (masqueraded,
as without pools); or through the proxy, and straight out when the proxy is down."""

_TEMPLATE_FIELDS = frozenset({"user", "sticky", "tenant", "pool"})


class ProxyPool(BaseModel):
    """One upstream proxy provider (docs/egress.md): where it is, how a user's exit is chosen (a port of
    ``ports`` or a ``{sticky}`` session in the username), and where its password is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    scheme: Literal["http", "https", "socks5"] = "http"
    host: str = Field(min_length=1, max_length=253)
    """A name or an IPv4 address. The controller resolves a name; guests get the address (an ``https``
    pool's guests keep the name, for its certificate, and may then use DNS)."""
    ports: str
    """``3128``, or a range ``10000-10099``: each port one sticky exit, a user gets one of them."""
    username: str | None = None
    """A template: ``{user}`` (the user's id), ``{sticky}`` (a session id the controller picks per user
    and changes on rotation), ``{tenant}``, ``{pool}``; e.g. ``user-{user}-session-{sticky}``."""
    password_file: Path | None = None
    """The password, in a file of its own (mode 600; surrounding whitespace is dropped)."""
    password_env: str | None = None
    """The name of an environment variable that holds the password."""

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        first, _, last = value.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"ports {value!r} is not PORT or FIRST-LAST (e.g. 3128 or 10000-10099)")
        low, high = int(first), int(last or first)
        if not 0 < low <= high < 65536:
            raise ValueError(f"ports {value!r} must lie within 1-65535, the first not above the last")
        return value

    @field_validator("username")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            names = {
                name for _text, name, _spec, _conv in string.Formatter().parse(value) if name is not None
            }
        except ValueError as exc:
            raise ValueError(f"username template {value!r}: {exc}") from None
        unknown = names - _TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"username template {value!r} names {', '.join(sorted(unknown))}; it may use only "
                + ", ".join("{" + n + "}" for n in sorted(_TEMPLATE_FIELDS))
            )
        return value

    @model_validator(mode="after")
    def _credentials(self) -> ProxyPool:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError(f"pool {self.name!r}: give password_file or password_env, not both")
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and self.username is None:
            raise ValueError(f"pool {self.name!r}: a password needs a username (template)")
        if self.username is not None and not has_password:
            raise ValueError(
                f"pool {self.name!r}: username {self.username!r} needs its password: set password_file "
                "(a file holding it) or password_env (the name of a variable holding it)"
            )
        if self.scheme == "socks5" and self.username is not None:
            raise ValueError(
                f"pool {self.name!r}: Chromium cannot authenticate to a SOCKS5 proxy; use the provider's "
                "http or https endpoint, or a socks5 pool that authorizes by address"
            )
        return self

    @property
    def port_range(self) -> range:
        first, _, last = self.ports.partition("-")
        return range(int(first), int(last or first) + 1)

    @property
    def sticky(self) -> bool:
        """Whether the username carries a per-user session id."""
        return self.username is not None and "{sticky}" in self.username

    @property
    def exits(self) -> int | None:
        """How many distinct exits the pool offers a user (``None``: as many as session ids)."""
        return None if self.sticky else len(self.port_range)

    def password(self) -> str | None:
        """Read now, not at start-up only, so that a rotated secret file is used from its next read."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise SettingsError(
                    f"egress pool {self.name!r}: cannot read password_file {self.password_file}: {exc.strerror}"
                ) from exc
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise SettingsError(
                    f"egress pool {self.name!r}: the variable {self.password_env} (password_env) is not set"
                )
            return value
        return None


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
    image_dir: Path | None = None
    """Built guest images and their cached stages; default ``state_dir/images`` (``browservm image``)."""
    cache: Path = Field(default_factory=_default_cache)
    """Download caches (Debian packages, pip, npm) of image builds and ``scripts/setup.sh``
    (``BROWSERVM_CACHE``): keep it across checkouts and CI runs so rebuilds download nothing twice."""
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
    guest_idle_timeout_s: float = Field(120.0, ge=0, le=3600)
    """A guest no controller has spoken to for this long ends itself (its agent stops it), so a stopped
    controller leaves nothing running for long; a restarted one reconnects to its sandboxes well within
    it. 0: never."""
    reconcile_interval_s: float = Field(15.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    browser_vcpus: int = Field(2, ge=1, le=64)
    """CPUs of a browser sandbox: a VM's vCPUs, a process sandbox's CPU quota (in cores)."""
    browser_memory_mib: int = Field(2048, ge=256)
    """Memory of a browser sandbox (Chromium, Xvfb, the streamer; its tmpfs counts too)."""
    cli_vcpus: int = Field(1, ge=1, le=64)
    cli_memory_mib: int = Field(2048, ge=128)
    sandbox_tasks_max: int = Field(1024, ge=64)
    """Processes and threads one sandbox may have (Chromium alone runs ~300 threads)."""
    sandbox_tmp_mib: int = Field(256, ge=16)
    """Size of each sandbox's in-memory ``/tmp`` and ``/dev/shm``."""
    sandbox_subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.88.0.0/16")
    """Guest addresses (each sandbox gets one, on a network namespace of its own); the first address is
    the host's side, where guests reach TURN and the demo sign-in server."""
    sandbox_egress: Literal["direct", "none"] = "direct"
    """Where a guest may connect beyond those host services: ``direct`` to any public address
    (masqueraded; never private, loopback or link-local ones), or ``none``."""
    guest_dns: list[str] = Field(default_factory=_host_resolvers)
    """DNS servers guests may use (JSON list); default: the host's, except loopback ones."""
    guest_host_ports: list[str] = Field(default_factory=list)
    """More services of this host guests may reach at the gateway address, as ``tcp/PORT`` or
    ``udp/PORT`` (JSON list): a proxy or sign-in server the operator runs on the host."""
    guest_turn_urls: list[str] = Field(default_factory=list)
    """TURN URLs the guests' streamers use, when they must differ from the viewers' (a TURN server
    guests reach at another address); empty: the local coturn at the gateway when ``run_coturn``, else
    ``turn_urls``."""

    # --- per-user egress (docs/egress.md)
    egress_pools: list[ProxyPool] = Field(default_factory=list)
    """Upstream proxy pools (JSON list, or an array of tables in the TOML file); empty: guests leave the
    host as ``sandbox_egress`` says, as before."""
    egress_policy: dict[str, EgressPolicy] = Field(default_factory=dict)
    """Per provider (``{"codex": "direct"}``); a provider not named gets ``proxy`` when a pool exists,
    else ``direct``."""
    egress_cli_vm_policy: Literal["proxy", "direct"] = "proxy"
    """How users' CLI VMs leave when a pool exists: through their user's exit (``proxy``), or ``direct``."""
    egress_check_url: str = "https://api.ipify.org"
    """Fetched through a user's proxy to check it; its body is the exit address it saw."""
    egress_check_interval_s: float = Field(300.0, gt=0)
    """How often every assignment is checked through its proxy."""
    egress_check_timeout_s: float = Field(10.0, gt=0)
    """A check (and so a session's start) gives up on a proxy after this long."""
    egress_recheck_s: float = Field(60.0, ge=0)
    """A session starts on an assignment checked good within this long with only a connect to its proxy;
    older, it is checked through the proxy first."""

    # --- what one client may hold (docs/controller.md, "Limits on clients")
    http_max_connections: int = Field(2048, ge=16)
    """Open connections (HTTP and WebSocket) at once; past it an idle kept-alive one is closed to make
    room, or the newcomer gets 503. Also kept below the process's open-file limit."""
    http_max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    """Request line plus headers; larger gets 431 and the connection is closed."""
    http_header_timeout_s: float = Field(10.0, gt=0)
    """The request line and headers must arrive within this time (of connecting, or of a kept-alive
    connection's first byte of its next request); else 408 and close."""
    http_body_timeout_s: float = Field(30.0, gt=0)
    """The whole body must arrive within this time of the headers; else 408 and close."""
    http_send_timeout_s: float = Field(30.0, gt=0)
    """A client that takes none of its answer for this long (the send buffer stays full: an exec's
    output, an event stream nobody reads) is disconnected."""
    http_keep_alive_s: float = Field(75.0, gt=0)
    """An idle kept-alive connection is closed after this. Above the usual 60 s of load balancers in
    front, so that they close first."""
    ws_max_message_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    """Largest WebSocket message a page may send (signaling, VNC input); larger closes with 1009."""
    rate_limit_per_s: float = Field(50.0, ge=0)
    """Requests per second one API key may make, sustained; past it 429 with ``Retry-After``. 0: off."""
    rate_limit_burst: int = Field(100, ge=1)
    """Requests one API key may make at once above the sustained rate."""
    max_event_streams: int = Field(1000, ge=1)
    """Server-sent event streams (session events and exec output) open at once, all keys together."""
    max_event_streams_per_key: int = Field(100, ge=1)
    """Of those, how many one API key may hold."""

    warm_pool_size: int = Field(1, ge=0)
    """Browser sandboxes kept booted (browser and streamer running) for the next sessions; each holds a
    capacity slot and ~300 MB. 0 turns the pool off. Must be below ``max_sandboxes``; left at its
    default, it shrinks to fit (a one-sandbox host keeps no pool)."""
    warm_pool_snapshots: bool = True
    """On a backend that takes snapshots (``qemu``), boot and prepare one warm sandbox, save it, and
    restore the others from it instead of booting each (docs/qemu.md has the figures)."""

    # --- microVMs (the qemu and firecracker backends)
    vm_kernel: Path | None = None
    """The guest image's uncompressed ``vmlinux`` (``browservm image build`` makes it)."""
    vm_initrd: Path | None = None
    """The guest image's initramfs (loads the virtio and ext4 modules of a modular kernel); optional."""
    vm_rootfs: Path | None = None
    """The guest image's root file system: an ext4 image every VM reads, never writes."""

    # --- qemu
    qemu_bin: str = "qemu-system-x86_64"
    """A path, or a name looked up on PATH."""
    qemu_accel: Literal["auto", "kvm", "tcg"] = "auto"
    """``auto``: KVM where ``/dev/kvm`` comes from ``kvm_intel``/``kvm_amd`` (hardware virtualization),
    TCG (software emulation) otherwise, e.g. on a PVM host. ``kvm`` or ``tcg`` force one."""

    # --- firecracker
    firecracker_bin: str = "firecracker"
    """A path, or a name looked up on PATH. The driver is written to Firecracker v1.16.1's API."""
    firecracker_jailer_bin: str = ""
    """Empty: firecracker runs unjailed. A path or name: every VM runs under Firecracker's jailer."""
    firecracker_jailer_uid: int | None = Field(None, ge=1)
    firecracker_jailer_gid: int | None = Field(None, ge=1)
    firecracker_chroot_base: Path = Path("/srv/jailer")
    """The jailer's ``--chroot-base-dir``; on the same file system as the image (files are hard-linked)."""

    # --- streaming and TURN
    screen_width: int = Field(1280, ge=320, le=3840)
    screen_height: int = Field(720, ge=240, le=2160)
    screen_fps: int = Field(30, ge=1, le=60)
    screen_max_width: int = Field(1920, ge=320, le=3840)
    """The remote screen follows each viewer's size (a phone's, a small iframe's) between 320x240 and
    this; the display's memory is allocated for the largest (about 8 MiB at 1920x1080)."""
    screen_max_height: int = Field(1080, ge=240, le=2160)
    codec: Literal["h264", "vp8"] = "h264"
    stun_urls: list[str] = Field(default_factory=list)
    turn_urls: list[str] = Field(default_factory=list)
    """e.g. ``turn:turn.example.com:3478?transport=udp``; empty disables TURN."""
    turn_secret: str = ""
    """coturn ``static-auth-secret`` (``use-auth-secret``): credentials are HMAC-SHA1 over ``expiry:user``."""
    turn_ttl_s: int = Field(3600, ge=60)
    media_public_ip: ipaddress.IPv4Address | None = None
    """A public address of this host whose UDP ports map 1:1 to browser sandboxes' streamers
    (``BROWSERVM_MEDIA_PUBLIC_IP``), so viewers reach a guest without TURN; unset: TURN only. TURN stays
    each viewer's fallback (docs/network.md)."""
    media_port_min: int = Field(40000, ge=1024, le=65535)
    """The first of the public UDP ports, one per browser sandbox (the sandbox's place in the subnet
    picks it)."""
    media_port_max: int = Field(40999, ge=1024, le=65535)
    media_guest_port: int = Field(40000, ge=1024, le=65535)
    """The UDP port each guest's streamer binds its mapped ICE socket to (the same in every guest)."""
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
    demo_oauth_port: int = Field(8081, ge=1, le=65535)
    """Its port, on the loopback and on the sandbox network's gateway (never the API's port: guests
    must not reach the API)."""

    @field_validator("state_dir", "cache", "image_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "must start with sqlite+aiosqlite:// or postgresql+asyncpg:// "
                "(e.g. postgresql+asyncpg://browservm:secret@127.0.0.1/browservm)"
            )
        return value

    @field_validator("guest_dns")
    @classmethod
    def _ipv4_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise ValueError(f'{address!r} is not an IPv4 address (e.g. ["9.9.9.9"])') from None
        return value

    @field_validator("guest_host_ports")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for entry in value:
            protocol, _, port = entry.partition("/")
            if protocol not in ("tcp", "udp") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f'{entry!r} is not tcp/PORT or udp/PORT (e.g. ["tcp/3128"])')
        return value

    @field_validator("sandbox_subnet")
    @classmethod
    def _subnet(cls, value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if value.prefixlen > 29:
            raise ValueError(f"{value} is too small: give at least a /29 (e.g. 10.88.0.0/16)")
        if not value.is_private:
            raise ValueError(f"{value} is not a private range (use e.g. 10.88.0.0/16)")
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
    def _media(self) -> Settings:
        if self.media_port_max < self.media_port_min:
            raise ValueError("BROWSERVM_MEDIA_PORT_MAX must not be below BROWSERVM_MEDIA_PORT_MIN")
        return self

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

    @field_validator("egress_check_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL (e.g. https://api.ipify.org)")
        return value

    @model_validator(mode="after")
    def _egress(self) -> Settings:
        names = [pool.name for pool in self.egress_pools]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"BROWSERVM_EGRESS_POOLS: pool names must differ; {', '.join(twice)} repeats")
        for provider, policy in self.egress_policy.items():
            if provider not in PROVIDERS:
                raise ValueError(
                    f"BROWSERVM_EGRESS_POLICY: no provider {provider!r} (known: {', '.join(PROVIDERS)})"
                )
            if policy != "direct" and not self.egress_pools:
                raise ValueError(
                    f"BROWSERVM_EGRESS_POLICY: {provider} is {policy!r} but no pool is configured "
                    "(set BROWSERVM_EGRESS_POOLS, or make it direct)"
                )
        return self

    def egress_policy_for(self, provider: str) -> EgressPolicy:
        return self.egress_policy.get(provider, "proxy" if self.egress_pools else "direct")

    @model_validator(mode="after")
    def _jailer(self) -> Settings:
        if self.firecracker_jailer_bin and (
            self.firecracker_jailer_uid is None or self.firecracker_jailer_gid is None
        ):
            raise ValueError(
                "BROWSERVM_FIRECRACKER_JAILER_UID and BROWSERVM_FIRECRACKER_JAILER_GID are required with "
                "BROWSERVM_FIRECRACKER_JAILER_BIN: the jailer drops firecracker to that unprivileged user"
            )
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
    def effective_image_dir(self) -> Path:
        return self.image_dir or self.state_dir / "images"

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
            first, *rest = error["loc"] or ("",)
            variable = f"BROWSERVM_{str(first).upper()}" if first else "configuration"
            # A field of a list's entry: BROWSERVM_EGRESS_POOLS[0].ports
            variable += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest)
            lines.append(f"{variable}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
