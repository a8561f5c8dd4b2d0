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
