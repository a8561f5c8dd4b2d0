"""Building the minimal guest image for real: its manifest, the cache, and the tree as a sandbox's root."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browservm import protocol
from browservm.cli import app
from browservm.doctor import check_image
from browservm.sandbox.channel import Channel
from browservm.sandbox.image import BuildResult, Caches, ImageBuilder, ImageStore, Recipe
from browservm.sandbox.image.recipe import GUEST_MODULES, GUEST_PYTHON_PACKAGES, agent_modules, agent_sources
from browservm.settings import load_settings
from tests.support.commands import shell

# The first test builds the image when the cache has none (minutes): more than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CHECKOUT = Path(__file__).resolve().parents[3]


def sandboxed(tree: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` in the tree as uid 1000, with nothing of the host bound (the command the issue names)."""
    command = ["bwrap", "--ro-bind", str(tree), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
               "--unshare-all", "--uid", "1000", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_manifest_names_every_package_and_output(minimal_build: BuildResult) -> None:
    image = minimal_build.image
    manifest = image.manifest
    packages = manifest.packages()
    assert manifest.variant == "minimal"
    assert set(manifest.stages) == {"root", "python", "guest", "kernel"}
    # Debian's packages, with their versions, from the tree's own dpkg database.
    assert packages["debian"]["python3"].startswith("3.11")
    assert "tini" in packages["debian"]
    assert "chromium" not in packages["debian"]  # the minimal variant has no browser
    # The guest's Python pins are the controller's, from requirements.lock.
    lock = dict(
        line.split("==") for line in (CHECKOUT / "requirements.lock").read_text().splitlines() if "==" in line
    )
    for name in GUEST_PYTHON_PACKAGES:
        assert packages["python"][name] == lock[name], name
    assert set(packages["python"]) <= set(lock), "every installed Python package is a locked one"
    kernel = packages["kernel"]
    assert kernel["release"].endswith("-amd64")
    assert "Debian" in kernel["linux"]
    loaded = kernel["modules"].split()
    assert set(GUEST_MODULES) <= set(loaded)
    for needed, user in [
        ("virtio", "virtio_mmio"),
        ("virtio_ring", "virtio_blk"),
        ("jbd2", "ext4"),
        ("vsock", "vmw_vsock_virtio_transport"),
    ]:
        assert loaded.index(needed) < loaded.index(user), f"{needed} must load before {user}"
    for name, output in manifest.outputs.items():
        assert output.bytes > 0, name
        assert (image.path / output.path).exists(), name
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert json.loads((image.tree / "etc/browservm/image.json").read_text())["variant"] == "minimal"


def test_building_again_with_nothing_changed_does_nothing(
    minimal_build: BuildResult, image_store: ImageStore, image_caches: Caches
) -> None:
    manifest = minimal_build.image.path / "manifest.json"
    before = manifest.stat().st_mtime_ns
    started = time.monotonic()
    again = ImageBuilder(image_store, image_caches).build(Recipe("minimal"))
    assert again.rebuilt == []
    assert again.image.path == minimal_build.image.path
    assert manifest.stat().st_mtime_ns == before
    assert time.monotonic() - started < 5.0, "a no-op build hashes the recipe and stops"


def _changed_agent_copy(into: Path) -> Path:
    """The checkout's guest code with one line added: a new agent, everything else the same."""
    source = CHECKOUT / "browservm"
    for path in agent_sources(source):
        target = into / "browservm" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    marker = f"AGENT_CHANGED_FOR_TEST = {time.time_ns()}\n"
    with (into / "browservm/guest/__init__.py").open("a") as out:
        out.write(marker)
    return into / "browservm"


def test_a_change_of_agent_code_rebuilds_only_the_guest_stage_then_list_and_prune(
    minimal_build: BuildResult, image_store: ImageStore, image_caches: Caches, tmp_path: Path
) -> None:
    original = minimal_build.image
    recipe = Recipe("minimal", package_dir=_changed_agent_copy(tmp_path))
    env = {**os.environ, "BROWSERVM_IMAGE_DIR": str(image_store.root)}
    started = time.monotonic()
    changed = ImageBuilder(image_store, image_caches).build(recipe)
    seconds = time.monotonic() - started
    try:
        assert changed.rebuilt == ["guest"]
        assert changed.image.path != original.path
        for stage in ("root", "python", "kernel"):
            assert changed.image.manifest.stages[stage] == original.manifest.stages[stage]
        installed = changed.image.tree / "opt/browservm/agent/browservm/guest/__init__.py"
        assert "AGENT_CHANGED_FOR_TEST" in installed.read_text()
        print(f"\nagent-only rebuild: {seconds:.1f} s")

        listing = CliRunner().invoke(app, ["image", "list", "--json"], env=env)
        assert listing.exit_code == 0, listing.output
        current = {row["name"]: row["current"] for row in json.loads(listing.output)}
        assert current[changed.image.path.name] is True, "the last build is the current one"
        assert current[original.path.name] is False
        text = CliRunner().invoke(app, ["image", "list"], env=env).output
        assert f"* {changed.image.path.name}" in text
        # The doctor compares the current image with the checkout's recipe: this one is not the checkout's.
        stale = check_image(load_settings(image_dir=image_store.root), "minimal")
        assert not stale.ok
        assert "out of date" in stale.detail
        assert "browservm image build --variant minimal" in stale.fix
    finally:
        # Back to the checkout's image; prune then removes the changed one and its guest stage.
        image_store.make_current("minimal", original.path)
    pruned = CliRunner().invoke(app, ["image", "prune"], env=env)
    assert pruned.exit_code == 0, pruned.output
    assert changed.image.path.name in pruned.output
    assert not changed.image.path.exists()
    assert original.path.exists()
    assert image_store.stage_record(recipe.stages()["guest"]) is None
    assert image_store.stage_record(Recipe("minimal").stages()["python"]) is not None
    fresh = check_image(load_settings(image_dir=image_store.root), "minimal")
    assert fresh.ok, fresh.detail
    assert original.key[:16] in fresh.detail


def test_the_agent_starts_in_the_tree_with_nothing_of_the_host(minimal_build: BuildResult) -> None:
    tree = minimal_build.image.tree
    helped = sandboxed(tree, "python3", "-m", "browservm.guest.agent", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--sandbox-id" in helped.stdout
    modules = agent_modules(CHECKOUT / "browservm")
    script = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nprint(sys.executable, sys.version)"
    imported = sandboxed(tree, "python3", "-c", script, *modules)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("/usr/bin/python3 3.11"), "the image's own Python"
    who = sandboxed(tree, "sh", "-c", "id -un; id -u; test -e /work && echo host-visible || echo no-host")
    assert who.stdout.split() == ["user", "1000", "no-host"]


def test_the_vm_launcher_adds_the_kernel_command_lines_environment(minimal_build: BuildResult) -> None:
    tree = minimal_build.image.tree
    encoded = base64.urlsafe_b64encode(json.dumps({"HTTPS_PROXY": "http://secret@proxy:1"}).encode()).decode()
    started = sandboxed(tree, "/usr/local/sbin/browservm-agent", encoded.rstrip("="), "--help")
    assert started.returncode == 0, started.stderr
    assert "environment from the kernel command line: HTTPS_PROXY" in started.stdout
    assert "secret" not in started.stdout + started.stderr
    assert "--sandbox-id" in started.stdout, "then it is the agent"
    refused = sandboxed(tree, "/usr/local/sbin/browservm-agent", "not base64 json!", "--help")
    assert refused.returncode != 0
    assert "browservm.env is not base64url JSON" in refused.stderr


async def test_the_agent_in_the_tree_serves_its_channel(minimal_build: BuildResult) -> None:
    """What the process backend will run: the tree as /, a writable home and run dir, the agent as uid 1000."""
    image = minimal_build.image
    agent = image.manifest.agent
    sandbox = Path(
        tempfile.mkdtemp(prefix="bvm-img-", dir="/tmp")
    )  # short: unix socket paths fit in 108 bytes
    (sandbox / "home").mkdir()
    (sandbox / "run").mkdir()
    # Left owned by us: bubblewrap maps the guest's uid 1000 to the uid that runs it.
    command = ["bwrap", "--ro-bind", str(image.tree), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
               "--tmpfs", "/run", "--bind", str(sandbox / "home"), agent.home, "--bind", str(sandbox / "run"),
               agent.run_dir, "--unshare-all", "--uid", str(agent.uid), "--gid", str(agent.gid),
               "--die-with-parent", "--new-session", "--chdir", agent.home, "--clearenv"]  # fmt: skip
    for name, value in agent.env.items():
        command += ["--setenv", name, value]
    command += ["--", *agent.command("img-test", "cli", f"unix:{agent.run_dir}/agent.sock")]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    socket = sandbox / "run/agent.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(socket))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert process.returncode is None, "the agent exited before listening"
                assert time.monotonic() < deadline, "the agent did not listen within 60 s"
                await asyncio.sleep(0.1)
        channel = await asyncio.wait_for(Channel.handshake("img-test", reader, writer), 30)
        try:
            code, output = await shell(channel, "id -u; . /etc/os-release; echo $VERSION_CODENAME")
            assert code == 0
            assert output.split() == ["1000", "bookworm"]
            home_file = sandbox / "home" / "written-by-the-guest"
            await channel.request(
                protocol.WriteFiles(
                    files=[
                        protocol.FileBlob(
                            path="written-by-the-guest", content_b64=base64.b64encode(b"hi").decode()
                        )
                    ],
                )
            )
            assert home_file.read_bytes() == b"hi"
        finally:
            await channel.close()
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)
        shutil.rmtree(sandbox, ignore_errors=True)
