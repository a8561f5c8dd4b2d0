"""``browservm image build``: runs the stages a recipe needs, reusing every cached one, then composes
the image's outputs (the tree and its read-only ext4, the kernel files) and checks the tree.

Each stage is built in a scratch directory and renamed into the store when complete, so an interrupted
build leaves nothing that a later one would mistake for finished work. With nothing changed, a build
finds the image under its key and does nothing at all.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from browservm.sandbox.image import layers, recipe
from browservm.sandbox.image.errors import ImageBuildError
from browservm.sandbox.image.layers import Below, Caches
from browservm.sandbox.image.manifest import ImageManifest, Output, StageRecord
from browservm.sandbox.image.recipe import Recipe, Stage
from browservm.sandbox.image.store import BuiltImage, ImageStore
from browservm.sandbox.image.tree import (
    STEP_TMP,
    compose,
    count_inodes,
    disk_usage,
    in_tree_argv,
    run_logged,
    which,
)

STEPS: dict[str, str] = {
    "root": "Debian root (mmdebstrap)",
    "python": "guest Python packages (pip)",
    "node": "Node.js",
    "clis": "provider CLIs (npm)",
    "guest": "agent code and init",
    "kernel": "kernel, vmlinux, initramfs",
    "tree": "compose the tree",
    "rootfs": "read-only ext4",
    "check": "check the tree",
}
"""Every step a build reports, in order, with its title (the progress bar shows them)."""


class Progress(Protocol):
    def begin(self, step: str, title: str) -> None: ...

    def end(self, step: str, *, cached: bool, seconds: float) -> None: ...


class _Silent:
    def begin(self, step: str, title: str) -> None:
        pass

    def end(self, step: str, *, cached: bool, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class BuildResult:
    image: BuiltImage
    rebuilt: list[str]
    """Steps that ran; empty when the image was already built."""
    seconds: float


@dataclass
class _Run:
    """One build in progress: where it works and what it has done."""

    recipe: Recipe
    stages: dict[str, Stage]
    records: dict[str, StageRecord] = field(default_factory=dict)
    layers: dict[str, Path] = field(default_factory=dict)
    rebuilt: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each step this build ran."""


def require_host_tools() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            "check", "image builds run as root (mmdebstrap installs packages into the tree as root)"
        )
    for program in ("mmdebstrap", "bwrap", "unshare", "mkfs.ext4", "depmod", "dpkg-query"):
        which(program)


class ImageBuilder:
    def __init__(self, store: ImageStore, caches: Caches, progress: Progress | None = None) -> None:
        self.store = store
        self.caches = caches
        self.progress: Progress = progress or _Silent()

    def build(self, recipe_: Recipe, *, rebuild: bool = False) -> BuildResult:
        started = time.monotonic()
        stages = recipe_.stages()
        key = recipe_.image_key(stages)
        with self.store.locked():
            existing = self.store.image(recipe_.variant, key)
            if existing is not None and not rebuild:
                self.store.make_current(recipe_.variant, existing.path)
                for step in self._steps(stages):
                    self.progress.begin(step, STEPS[step])
                    self.progress.end(step, cached=True, seconds=0.0)
                return BuildResult(existing, [], time.monotonic() - started)
            require_host_tools()
            self.store.clear_scratch()
            run = _Run(recipe_, stages)
            for stage in stages.values():
                self._stage(run, stage, rebuild=rebuild)
            image = self._outputs(run, key, started)
        return BuildResult(image, run.rebuilt, time.monotonic() - started)

    @staticmethod
    def _steps(stages: dict[str, Stage]) -> list[str]:
        return [*stages, "tree", "rootfs", "check"]

    # ------------------------------------------------------------------------------------------ stages

    def _stage(self, run: _Run, stage: Stage, *, rebuild: bool) -> None:
        self.progress.begin(stage.name, STEPS[stage.name])
        record = None if rebuild else self.store.stage_record(stage)
        if record is not None:
            run.records[stage.name] = record
            run.layers[stage.name] = self.store.stage_path(stage) / "layer"
            self.progress.end(stage.name, cached=True, seconds=0.0)
            return
        started = time.monotonic()
        scratch = self.store.scratch(stage.name)
        layer = scratch / "layer"
        below = Below(run.recipe, self.caches, dict(run.layers))
        packages = layers.BUILDERS[stage.name](below, layer, scratch / "build.log")
        seconds = time.monotonic() - started
        record = StageRecord(
            name=stage.name,
            key=stage.key,
            inputs=stage.inputs,
            built_at=datetime.now(UTC),
            seconds=round(seconds, 2),
            packages=packages,
        )
        path = self.store.commit_stage(scratch, stage, record)
        run.records[stage.name] = record
        run.layers[stage.name] = path / "layer"
        run.rebuilt.append(stage.name)
        run.seconds[stage.name] = round(seconds, 2)
        self.progress.end(stage.name, cached=False, seconds=seconds)

    # ------------------------------------------------------------------------------------------ outputs

    def _outputs(self, run: _Run, key: str, started: float) -> BuiltImage:
        scratch = self.store.scratch(f"{run.recipe.variant}-image")
        log = scratch / "build.log"

        self._step(run, "tree", lambda: self._compose(run, scratch / "tree"))
        self._step(run, "rootfs", lambda: self._rootfs(scratch / "tree", scratch / "rootfs.ext4", key, log))
        for name in ("vmlinux", "vmlinuz", "initramfs.img", "config"):
            os.link(run.layers["kernel"] / name, scratch / name)
        self._step(run, "check", lambda: self._check(run, scratch / "tree", log))

        outputs = {"tree": Output(path="tree", bytes=disk_usage(scratch / "tree"))}
        for name in ("rootfs.ext4", "vmlinux", "vmlinuz", "initramfs.img"):
            outputs[name] = Output(path=name, bytes=(scratch / name).stat().st_size)
        manifest = ImageManifest(
            variant=run.recipe.variant,
            key=key,
            built_at=datetime.now(UTC),
            build_seconds=round(time.monotonic() - started, 2),
            rebuilt=list(run.rebuilt),
            step_seconds=run.seconds,
            stages=run.records,
            outputs=outputs,
        )
        return self.store.commit_image(scratch, manifest)

    def _step(self, run: _Run, step: str, work: Callable[[], None]) -> None:
        self.progress.begin(step, STEPS[step])
        started = time.monotonic()
        work()
        seconds = time.monotonic() - started
        run.seconds[step] = round(seconds, 2)
        self.progress.end(step, cached=False, seconds=seconds)

    def _compose(self, run: _Run, tree: Path) -> None:
        compose([run.layers[name] for name in run.stages if name != "kernel"], tree)
        if "clis" in run.layers:
            # On PATH for the agent, the CLIs' own scripts (#!/usr/bin/env node) and a user's shell.
            bin_dir = tree / "usr/local/bin"
            links = {
                "node": f"{layers.NODE_BIN}/node",
                "npm": layers.NPM_CLI,
                "npx": layers.NPX_CLI,
                **{cli: f"{recipe.CLI_DIR}/node_modules/.bin/{cli}" for cli in ("claude", "codex", "gemini")},
            }
            for name, target in links.items():
                (bin_dir / name).symlink_to(target)
        # A small record inside the guest of what it runs (a new file: nothing hard-linked is touched).
        (tree / "etc/browservm/image.json").write_text(
            json.dumps({"variant": run.recipe.variant, "stages": {n: s.key for n, s in run.stages.items()}})
            + "\n"
        )

    def _rootfs(self, tree: Path, image: Path, key: str, log: Path) -> None:
        used = disk_usage(tree)
        # Room for ext4's own metadata and a margin; read-only, so no journal and no reserved blocks.
        size_mib = int(used * 1.1 / 2**20) + 64
        inodes = int(count_inodes(tree) * 1.1) + 1024
        run_logged(
            "rootfs",
            ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-d", str(tree), "-L", "browservm", "-m", "0",
             "-N", str(inodes), "-O", "^has_journal", "-U", str(uuid.UUID(key[:32])),
             str(image), f"{size_mib}M"],
            log,
        )  # fmt: skip

    def _check(self, run: _Run, tree: Path, log: Path) -> None:
        """Start what the image promises, as the guest's user with nothing of the host bound."""
        modules = recipe.agent_modules(run.recipe.package_dir)
        checks = [
            ["python3", "-m", "browservm.guest.agent", "--help"],
            [
                "python3",
                "-c",
                "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)",
                *modules,
            ],
        ]
        if run.recipe.variant == "browser":
            checks += [
                ["python3", "-c", "import pixelflux, av, aiortc"],
                ["chromium", "--version"],
                ["x11vnc", "-version"],
                ["node", "--version"],
                *[
                    [f"{recipe.CLI_DIR}/node_modules/.bin/{cli}", "--version"]
                    for cli in ("claude", "codex", "gemini")
                ],
            ]
        for argv in checks:
            run_logged("check", in_tree_argv(tree, argv, uid=recipe.USER_UID, env={"HOME": STEP_TMP}), log)
