"""What the controller names in each sandbox's spec: the current browser image, with the VM files an
operator configured in place of its own."""

from __future__ import annotations

import os
from pathlib import Path

from browservm.sandbox.image import ImageStore, guest_image
from browservm.settings import Settings
from tests.support.image import image_tree


def test_the_spec_names_the_current_browser_image(tmp_path: Path) -> None:
    image_tree()  # built, or the test says how
    image_dir = Path(os.environ["BROWSERVM_IMAGE_DIR"])
    built = ImageStore(image_dir).current("browser")
    assert built is not None
    named = guest_image(Settings(state_dir=tmp_path, image_dir=image_dir))
    assert named == built.guest()
    assert (named.tree, named.kernel, named.rootfs) == (built.tree, built.vmlinux, built.rootfs)


def test_configured_vm_files_replace_the_images_own(tmp_path: Path) -> None:
    image_tree()
    image_dir = Path(os.environ["BROWSERVM_IMAGE_DIR"])
    kernel, rootfs = tmp_path / "vmlinux", tmp_path / "root.ext4"
    named = guest_image(Settings(state_dir=tmp_path, image_dir=image_dir, vm_kernel=kernel, vm_rootfs=rootfs))
    assert named is not None
    assert (named.kernel, named.rootfs, named.initrd) == (kernel, rootfs, None)
    assert named.tree == image_tree(), "the process backend still runs the built tree"
    assert "BROWSERVM_VM_ROOTFS" in named.name
    # Half of it set: no name, so that the backend's own lookup says what is missing.
    assert guest_image(Settings(state_dir=tmp_path, image_dir=image_dir, vm_kernel=kernel)) is None


def test_no_image_built_names_none(tmp_path: Path) -> None:
    assert guest_image(Settings(state_dir=tmp_path, image_dir=tmp_path / "empty")) is None
