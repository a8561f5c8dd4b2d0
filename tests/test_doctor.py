"""``browservm doctor`` against the real host: real binaries, a real SQLite file, a real PostgreSQL."""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import pytest

from browservm import doctor
from browservm.settings import Settings, load_settings


def _settings(state_dir: Path, **overrides: object) -> Settings:
    return load_settings(state_dir=state_dir, database_url="", **overrides)


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_set_up_host_passes_every_required_check(tmp_path: Path) -> None:
    checks = doctor.run(_settings(tmp_path / "state"))

    names = [check.name for check in checks]
    assert names == [
        "state_dir",
        "disk",
        "kvm",
        "qemu",
        "firecracker",
        "chromium",
        "xvfb",
        "x11vnc",
        "coturn",
        "bubblewrap",
        "cgroups",
        "netns",
        "novnc",
        "image",
        "database",
    ]
    assert doctor.failures(checks) == [], "run scripts/setup.sh first:\n" + "\n".join(
        f"{c.name}: {c.detail} -> {c.fix}" for c in doctor.failures(checks)
    )
    found = _by_name(checks)
    assert "Chromium" in found["chromium"].detail
    assert found["novnc"].detail.startswith("noVNC 1.")


def test_missing_programs_each_name_the_package_that_installs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    found = _by_name(doctor.run(_settings(tmp_path / "state", backend="qemu")))

    for name, package in [
        ("chromium", "chromium"),
        ("xvfb", "xvfb"),
        ("x11vnc", "x11vnc"),
        ("bubblewrap", "bubblewrap"),
        ("netns", "iproute2"),
        ("qemu", "qemu-system-x86"),
    ]:
        assert not found[name].ok, name
        assert f"apt-get install -y --no-install-recommends {package}" in found[name].fix
    # With the QEMU backend chosen, a missing QEMU fails the doctor; coturn stays optional.
    failing = {check.name for check in doctor.failures(list(found.values()))}
    assert "qemu" in failing
    assert "coturn" not in failing


def test_kvm_reports_what_this_host_can_run() -> None:
    check = doctor.check_kvm()
    modules = Path("/sys/module")
    hardware = (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists()
    if not Path("/dev/kvm").exists():
        assert not check.ok
        assert "TCG" in check.detail
    elif (modules / "kvm_pvm").exists() and not hardware:
        assert not check.ok
        assert "PVM" in check.detail
        assert "docs/limits.md" in check.detail
    else:
        assert check.ok
    assert not check.required, "the process backend runs without KVM: the doctor must not fail on it"


async def test_an_existing_sqlite_database_is_opened(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sqlite3.connect(settings.state_dir / "browservm.db").execute("CREATE TABLE t (x)").connection.close()

    check = await doctor.check_database(settings)

    assert check.ok, check.detail
    assert "SQLite 3." in check.detail


async def test_a_missing_sqlite_database_is_left_for_serve_to_create(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "state")

    check = await doctor.check_database(settings)

    assert check.ok
    assert "not created yet" in check.detail
    assert not (tmp_path / "state").exists(), "the doctor must not create anything"


async def test_a_corrupt_sqlite_database_fails(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    (tmp_path / "browservm.db").write_bytes(b"this is not a database, " * 100)

    check = await doctor.check_database(settings)

    assert not check.ok
    assert "not a database" in check.detail
    assert check.fix


async def test_an_unreachable_postgresql_fails_without_showing_its_password(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://browservm:s3cret-pw@127.0.0.1:{_closed_port()}/browservm"
    settings = load_settings(state_dir=tmp_path, database_url=url)

    check = await doctor.check_database(settings, timeout_s=5)

    assert not check.ok
    assert "s3cret-pw" not in check.detail
    assert "***" in check.detail
    assert "pg_ctlcluster 15 main start" in check.fix


@pytest.mark.postgres
async def test_a_running_postgresql_answers_with_its_version(tmp_path: Path) -> None:
    url = os.environ.get("BROWSERVM_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("BROWSERVM_REQUIRE_POSTGRES") == "1":
            pytest.fail("BROWSERVM_REQUIRE_POSTGRES=1 but BROWSERVM_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL: run through scripts/test.sh")

    check = await doctor.check_database(load_settings(state_dir=tmp_path, database_url=url))

    assert check.ok, check.detail
    assert "PostgreSQL" in check.detail


def test_a_state_dir_that_cannot_be_written_fails(tmp_path: Path) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("")

    assert not doctor.check_state_dir(a_file).ok
    assert "not a directory" in doctor.check_state_dir(a_file).detail
    # /proc refuses new files even to root, which os.access would have allowed.
    unwritable = doctor.check_state_dir(Path("/proc/browservm-state"))
    assert not unwritable.ok
    assert "cannot write in /proc" in unwritable.detail
    assert "BROWSERVM_STATE_DIR" in unwritable.fix


def test_a_writable_state_dir_passes_and_is_left_clean(tmp_path: Path) -> None:
    check = doctor.check_state_dir(tmp_path)

    assert check.ok
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_space_fails() -> None:
    check = doctor.check_disk_space(Path("/tmp"), min_free_bytes=2**60)

    assert not check.ok
    assert "GiB free at /tmp" in check.detail
    assert "BROWSERVM_STATE_DIR" in check.fix


def test_missing_novnc_assets_point_to_the_set_up(tmp_path: Path) -> None:
    check = doctor.check_novnc(tmp_path)

    assert not check.ok
    assert "scripts/setup.sh" in check.fix


def test_firecracker_line_names_the_binary_its_version_and_the_kvm_it_would_run_on(tmp_path: Path) -> None:
    import sys

    from browservm.sandbox import vmhost

    standin = Path(__file__).parent / "sandbox" / "firecracker" / "standin.py"
    binary = tmp_path / "firecracker"
    binary.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{standin}' \"$@\"\n")
    binary.chmod(0o755)

    chosen = _settings(tmp_path / "state", backend="firecracker", firecracker_bin=str(binary))
    check = doctor.check_firecracker(chosen)
    assert f"{binary}: Firecracker v1.16.1" in check.detail
    assert f"KVM: {vmhost.kvm_module() or 'no KVM module'}" in check.detail
    assert (
        "/dev/vhost-vsock present" if Path("/dev/vhost-vsock").exists() else "no /dev/vhost-vsock"
    ) in check.detail
    assert check.required, "with BROWSERVM_BACKEND=firecracker the line decides the doctor's verdict"
    if vmhost.kvm_module() not in ("kvm_intel", "kvm_amd"):
        assert not check.ok and "docs/firecracker.md" in check.fix

    missing = doctor.check_firecracker(_settings(tmp_path / "state", firecracker_bin=str(tmp_path / "none")))
    assert not missing.ok and not missing.required
    assert "not found or not executable" in missing.detail


def test_a_missing_guest_image_says_how_to_build_it(tmp_path: Path) -> None:
    check = doctor.check_image(load_settings(state_dir=tmp_path, image_dir=tmp_path / "images"))
    assert not check.ok
    assert check.required, "every process sandbox runs the image as its root"
    assert str(tmp_path / "images") in check.detail
    assert "browservm image build --variant browser" in check.fix
