"""Stage keys: what each stage's cache depends on, and nothing more."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from browservm.sandbox.image.recipe import Recipe, agent_sources

CHECKOUT = Path(__file__).resolve().parents[3]


def _copy_agent(into: Path) -> Path:
    source = CHECKOUT / "browservm"
    for path in agent_sources(source):
        target = into / "browservm" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return into / "browservm"


def _keys(recipe: Recipe) -> dict[str, str]:
    return {name: stage.key for name, stage in recipe.stages().items()}


def test_keys_are_the_same_for_the_same_recipe(tmp_path: Path) -> None:
    copy = _copy_agent(tmp_path)
    assert _keys(Recipe("minimal")) == _keys(Recipe("minimal", package_dir=copy)), "file times do not count"
    assert Recipe("minimal").image_key() == Recipe("minimal", package_dir=copy).image_key()


def test_a_change_of_agent_code_changes_only_the_guest_key(tmp_path: Path) -> None:
    copy = _copy_agent(tmp_path)
    (copy / "guest/display.py").write_text((copy / "guest/display.py").read_text() + "\n# changed\n")
    before, after = _keys(Recipe("browser")), _keys(Recipe("browser", package_dir=copy))
    assert [name for name in before if before[name] != after[name]] == ["guest"]
    assert Recipe("browser").image_key() != Recipe("browser", package_dir=copy).image_key()


def test_a_change_of_pins_rebuilds_the_python_stage_and_what_stands_on_it(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text((CHECKOUT / "requirements.lock").read_text().replace("structlog==", "structlog==0.0.0+"))
    before, after = _keys(Recipe("minimal")), _keys(Recipe("minimal", lock_file=lock))
    assert sorted(name for name in before if before[name] != after[name]) == ["guest", "python"]


def test_variants_differ_in_their_packages_and_stages() -> None:
    browser, minimal = Recipe("browser"), Recipe("minimal")
    assert "chromium" in browser.apt_packages
    assert "chromium" not in minimal.apt_packages
    assert list(browser.stages()) == ["root", "python", "node", "clis", "guest", "kernel"]
    assert list(minimal.stages()) == ["root", "python", "guest", "kernel"]
    # One kernel for both: its key does not depend on the variant.
    assert browser.stages()["kernel"].key == minimal.stages()["kernel"].key
    assert browser.stages()["root"].key != minimal.stages()["root"].key


def test_a_guest_dependency_missing_from_the_lock_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("".join(line + "\n" for line in (CHECKOUT / "requirements.lock").read_text().splitlines()
                            if not line.startswith("aiortc==")))  # fmt: skip
    with pytest.raises(ValueError, match=r"aiortc is a guest dependency but .* does not pin it"):
        Recipe("minimal", lock_file=lock).stages()


def test_a_missing_lock_file_says_where_the_pins_come_from(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"requirements\.lock not found"):
        Recipe("minimal", lock_file=tmp_path / "requirements.lock").stages()


def test_the_agent_sources_are_the_guest_and_what_it_imports() -> None:
    names = {str(path.relative_to(CHECKOUT / "browservm")) for path in agent_sources()}
    assert {"__init__.py", "aio.py", "protocol/peer.py", "guest/agent.py", "guest/providers/base.py"} <= names
    assert not any(name.startswith(("controller/", "store/", "sandbox/", "web/")) for name in names)
