"""Settings: one typed object; a wrong value is refused with a message that names the variable."""

from __future__ import annotations

import pytest

from browservm.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"ice_host_addresses": ["localhost"]}, "BROWSERVM_ICE_HOST_ADDRESSES"),
        ({"turn_urls": ["turn:127.0.0.1:3478"]}, "BROWSERVM_TURN_SECRET"),
        ({"screen_width": 100}, "BROWSERVM_SCREEN_WIDTH"),
        ({"database_url": "sqlite:///x.db"}, "BROWSERVM_DATABASE_URL"),
        ({"warm_pool_size": 4, "max_sandboxes": 4}, "BROWSERVM_WARM_POOL_SIZE"),
    ],
)
def test_wrong_values_name_the_variable(overrides: dict[str, object], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(**overrides)


def test_defaults_are_embedded_and_local(tmp_path: object) -> None:
    settings = load_settings(state_dir=str(tmp_path))
    assert settings.effective_database_url.startswith("sqlite+aiosqlite:///")
    assert settings.effective_public_url == "http://127.0.0.1:8080"
    assert settings.backend == "process" and settings.ice_host_addresses == []


def test_run_coturn_defaults_its_turn_urls_to_loopback() -> None:
    settings = load_settings(run_coturn=True, turn_secret="s3cret-s3cret")
    assert settings.turn_urls[0].startswith("turn:127.0.0.1:3478")


def test_the_default_warm_pool_fits_the_host() -> None:
    assert load_settings().effective_warm_pool_size == 1
    assert load_settings(max_sandboxes=1).effective_warm_pool_size == 0, "a one-sandbox host keeps no pool"
    assert load_settings(warm_pool_size=0).effective_warm_pool_size == 0


POOL = {"name": "resi", "host": "10.0.0.1", "ports": "10000-10009"}


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({**POOL, "ports": "10009-10000"}, r"EGRESS_POOLS\[0\]\.ports: .*first not above the last"),
        ({**POOL, "ports": "a-b"}, r"EGRESS_POOLS\[0\]\.ports: .*is not PORT or FIRST-LAST"),
        ({**POOL, "scheme": "ftp"}, r"EGRESS_POOLS\[0\]\.scheme"),
        ({**POOL, "username": "u-{account}"}, r"names account; it may use only"),
        ({**POOL, "username": "u-{user}"}, r"needs its password: set password_file"),
        ({**POOL, "password_env": "P"}, r"a password needs a username"),
        (
            {**POOL, "scheme": "socks5", "username": "u", "password_env": "P"},
            r"Chromium cannot authenticate to a SOCKS5 proxy",
        ),
    ],
)
def test_a_wrong_pool_is_refused_with_what_to_fix(pool: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(egress_pools=[pool])


def test_egress_policies() -> None:
    assert load_settings().egress_policy_for("codex") == "direct", "no pool: as before"
    settings = load_settings(egress_pools=[POOL], egress_policy={"codex": "direct"})
    assert settings.egress_policy_for("demo") == "proxy", "a pool makes proxy the default"
    assert settings.egress_policy_for("codex") == "direct"
    with pytest.raises(SettingsError, match="no provider 'cursor'"):
        load_settings(egress_pools=[POOL], egress_policy={"cursor": "direct"})
    with pytest.raises(SettingsError, match="but no pool is configured"):
        load_settings(egress_policy={"codex": "proxy-then-direct"})
    with pytest.raises(SettingsError, match="resi repeats"):
        load_settings(egress_pools=[POOL, POOL])


def test_a_pool_password_comes_from_its_file_or_variable(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    secret = Path(str(tmp_path)) / "proxy.secret"
    secret.write_text("hunter2\n")
    pool = load_settings(egress_pools=[{**POOL, "username": "u", "password_file": str(secret)}]).egress_pools[
        0
    ]
    assert pool.password() == "hunter2"
    pool = load_settings(
        egress_pools=[{**POOL, "username": "u", "password_env": "BVM_TEST_PW"}]
    ).egress_pools[0]
    with pytest.raises(SettingsError, match=r"BVM_TEST_PW .* is not set"):
        pool.password()
    monkeypatch.setenv("BVM_TEST_PW", "s3")
    assert pool.password() == "s3"
