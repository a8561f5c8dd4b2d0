"""Trees on disk, the build steps' runner, and the image commands' answers to bad input (no build needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browservm.cli import app
from browservm.sandbox.image.errors import ImageBuildError
from browservm.sandbox.image.store import ImageStore
from browservm.sandbox.image.tree import compose, disk_usage, remove, run_logged


def test_a_failing_step_names_itself_its_exit_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    with pytest.raises(ImageBuildError) as failed:
        run_logged("python", ["sh", "-c", "echo resolving; echo 'no matching distribution' >&2; exit 3"], log)
    message = str(failed.value)
    assert "image build step 'python' failed: sh exited with status 3" in message
    assert f"full log: {log}" in message
    assert "no matching distribution" in message, "the output's tail comes with the error"


def test_a_missing_program_says_so(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="no-such-builder-tool is not installed"):
        run_logged("root", ["no-such-builder-tool"], tmp_path / "log")


def test_layers_merge_by_hard_links_and_are_counted_once(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "usr/bin").mkdir(parents=True)
    (lower / "usr/bin/tool").write_bytes(os.urandom(64 * 1024))
    (upper / "usr/bin").mkdir(parents=True)
    (upper / "usr/bin/other").write_bytes(os.urandom(64 * 1024))
    tree = tmp_path / "tree"
    compose([lower, upper], tree)
    assert sorted(p.name for p in (tree / "usr/bin").iterdir()) == ["other", "tool"]
    assert (tree / "usr/bin/tool").stat().st_ino == (lower / "usr/bin/tool").stat().st_ino
    assert disk_usage(tmp_path) < disk_usage(lower) + disk_usage(upper) + disk_usage(tree), (
        "shared files count once"
    )
    assert disk_usage(tree) >= 128 * 1024


def test_a_read_only_tree_is_removed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/file").write_text("x")
    (tree / "etc").chmod(0o555)
    remove(tree)
    assert not tree.exists()


def test_an_unknown_variant_is_refused_with_the_choices() -> None:
    result = CliRunner().invoke(app, ["image", "build", "--variant", "desktop"])
    assert result.exit_code == 2
    assert "--variant must be one of browser, minimal, not 'desktop'" in result.output


def test_list_and_prune_of_an_empty_store(tmp_path: Path) -> None:
    env = {**os.environ, "BROWSERVM_IMAGE_DIR": str(tmp_path / "images")}
    listing = CliRunner().invoke(app, ["image", "list"], env=env)
    assert listing.exit_code == 0
    assert "no images in" in listing.output
    assert "browservm image build" in listing.output
    pruned = CliRunner().invoke(app, ["image", "prune"], env=env)
    assert pruned.exit_code == 0
    assert "removed 0 image(s) and 0 cached stage(s)" in pruned.output
    assert ImageStore(tmp_path / "images").images() == []
