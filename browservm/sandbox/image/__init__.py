"""The guest image: one Debian tree for every backend, built, cached and checked by ``browservm image``.

Outputs of one build (:class:`BuiltImage`): ``tree/`` (the process backend's ``/``), ``rootfs.ext4`` (the
same tree, read-only, for VMs), ``vmlinux``/``vmlinuz`` and ``initramfs.img``. See docs/image.md.
"""

from __future__ import annotations

from pathlib import Path

from browservm.sandbox.base import GuestImage
from browservm.sandbox.image.builder import STEPS, BuildResult, ImageBuilder, Progress
from browservm.sandbox.image.errors import ImageBuildError
from browservm.sandbox.image.layers import Caches
from browservm.sandbox.image.manifest import AgentCommand, ImageManifest
from browservm.sandbox.image.recipe import VARIANTS, Recipe, Variant
from browservm.sandbox.image.store import BuiltImage, ImageStore, Pruned
from browservm.settings import Settings

__all__ = [
    "STEPS",
    "VARIANTS",
    "AgentCommand",
    "BuildResult",
    "BuiltImage",
    "Caches",
    "ImageBuildError",
    "ImageBuilder",
    "ImageManifest",
    "ImageStore",
    "Progress",
    "Pruned",
    "Recipe",
    "Variant",
    "builder_for",
    "current_image",
    "current_tree",
    "guest_image",
    "store_for",
]


def store_for(settings: Settings) -> ImageStore:
    return ImageStore(settings.effective_image_dir)


def builder_for(settings: Settings, progress: Progress | None = None) -> ImageBuilder:
    return ImageBuilder(store_for(settings), Caches.under(settings.cache), progress)


def current_image(settings: Settings, variant: Variant = "browser") -> BuiltImage | None:
    """The image a backend should run (the last one built of ``variant``), or None."""
    return store_for(settings).current(variant)


def guest_image(settings: Settings) -> GuestImage | None:
    """The image new sandboxes run now: the current browser image, its VM files replaced by
    ``BROWSERVM_VM_KERNEL``/``_ROOTFS``/``_INITRD`` where set; ``None`` when there is neither."""
    if (settings.vm_kernel is None) != (settings.vm_rootfs is None):
        return None  # half set: the backend's own lookup says what is missing
    built = current_image(settings, "browser")
    image = built.guest() if built is not None else None
    if settings.vm_kernel is not None and settings.vm_rootfs is not None:
        return GuestImage(
            name=f"{settings.vm_rootfs.name} (BROWSERVM_VM_ROOTFS)",
            tree=image.tree if image is not None else None,
            kernel=settings.vm_kernel,
            rootfs=settings.vm_rootfs,
            initrd=settings.vm_initrd,
        )
    return image


def current_tree(settings: Settings, variant: Variant = "browser") -> Path:
    """The tree of the current image; :class:`LookupError` saying how to build one when there is none."""
    image = current_image(settings, variant)
    if image is None:
        raise LookupError(
            f"no {variant} guest image in {settings.effective_image_dir}: build it with "
            f"'browservm image build --variant {variant}' (scripts/run.sh does, in a few minutes)"
        )
    return image.tree
