"""The image cache on disk (``BROWSERVM_IMAGE_DIR``, by default ``$BROWSERVM_STATE_DIR/images``)::

    images/
      stages/root-<key>/        a cached stage: layer/ (its tree fragment) and stage.json
      stages/python-<key>/ ...
      minimal-<key>/            a built image: tree/, rootfs.ext4, vmlinux, vmlinuz, initramfs.img,
                                config, manifest.json
      minimal -> minimal-<key>  the variant's current image (the last one built)
      .tmp/                     builds in progress; anything here after a crash is removed
      .lock

Everything is written under ``.tmp`` and renamed into place when complete, so a directory with a
``manifest.json`` (image) or ``stage.json`` (stage) is whole. One build or prune at a time (``.lock``).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from browservm.sandbox.base import GuestImage
from browservm.sandbox.image import recipe
from browservm.sandbox.image.manifest import ImageManifest, StageRecord
from browservm.sandbox.image.recipe import Stage, Variant
from browservm.sandbox.image.tree import remove


@dataclass(frozen=True, slots=True)
class BuiltImage:
    path: Path
    manifest: ImageManifest

    @property
    def variant(self) -> Variant:
        return self.manifest.variant

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def tree(self) -> Path:
        """The root directory (the process backend binds it read-only as ``/``)."""
        return self.path / "tree"

    @property
    def rootfs(self) -> Path:
        """The same tree as a read-only ext4 image (the VMs' ``/dev/vda``)."""
        return self.path / "rootfs.ext4"

    @property
    def vmlinux(self) -> Path:
        """Uncompressed ELF kernel (Firecracker; QEMU boots it too, by its PVH entry)."""
        return self.path / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.img"

    def guest(self) -> GuestImage:
        """What a :class:`~browservm.sandbox.base.SandboxSpec` names to run this image."""
        return GuestImage(self.path.name, self.tree, self.vmlinux, self.rootfs, self.initramfs)


@dataclass(frozen=True, slots=True)
class Pruned:
    images: list[str]
    stages: list[str]


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_path(self, stage: Stage) -> Path:
        return self.stages_dir / f"{stage.name}-{stage.short}"

    def image_path(self, variant: Variant, key: str) -> Path:
        return self.root / f"{variant}-{key[:16]}"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def scratch(self, name: str) -> Path:
        """A fresh directory under ``.tmp`` for a build in progress (call under :meth:`locked`)."""
        path = self.root / ".tmp" / f"{name}-{secrets.token_hex(4)}"
        path.mkdir(parents=True)
        return path

    def clear_scratch(self) -> None:
        """Remove what builds that died left behind (call under :meth:`locked`)."""
        remove(self.root / ".tmp")

    # --- stages

    def stage_record(self, stage: Stage) -> StageRecord | None:
        path = self.stage_path(stage) / "stage.json"
        try:
            return StageRecord.model_validate_json(path.read_text())
        except (FileNotFoundError, ValidationError):
            return None

    def commit_stage(self, scratch: Path, stage: Stage, record: StageRecord) -> Path:
        (scratch / "stage.json").write_text(record.model_dump_json(indent=2))
        final = self.stage_path(stage)
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        remove(final)  # a rebuild (--rebuild) replaces it
        scratch.rename(final)
        return final

    # --- images

    def load(self, path: Path) -> BuiltImage | None:
        try:
            return BuiltImage(path, ImageManifest.model_validate_json((path / "manifest.json").read_text()))
        except (FileNotFoundError, NotADirectoryError, ValidationError):
            return None

    def image(self, variant: Variant, key: str) -> BuiltImage | None:
        return self.load(self.image_path(variant, key))

    def current(self, variant: Variant) -> BuiltImage | None:
        link = self.root / variant
        return self.load(link.resolve()) if link.is_symlink() else None

    def images(self) -> list[BuiltImage]:
        """Every complete image, newest first."""
        if not self.root.is_dir():
            return []
        found = [
            image
            for path in self.root.iterdir()
            if not path.is_symlink() and path.name.split("-")[0] in recipe.VARIANTS
            for image in [self.load(path)]
            if image is not None
        ]
        return sorted(found, key=lambda image: image.manifest.built_at, reverse=True)

    def commit_image(self, scratch: Path, manifest: ImageManifest) -> BuiltImage:
        (scratch / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        final = self.image_path(manifest.variant, manifest.key)
        remove(final)
        scratch.rename(final)
        self.make_current(manifest.variant, final)
        image = self.load(final)
        assert image is not None
        return image

    def make_current(self, variant: Variant, path: Path) -> None:
        link = self.root / variant
        fresh = self.root / f".{variant}.{secrets.token_hex(4)}"
        fresh.symlink_to(path.name)
        os.replace(fresh, link)  # atomic: a reader sees the old image or the new one

    def prune(self, *, everything: bool = False) -> Pruned:
        """Remove images other than each variant's current one (all of them with ``everything``), the
        stages no remaining image was built from, and leftovers of dead builds. Call under :meth:`locked`."""
        keep: list[BuiltImage] = []
        if not everything:
            keep = [image for variant in recipe.VARIANTS if (image := self.current(variant)) is not None]
        kept_paths = {image.path for image in keep}
        removed_images = []
        for image in self.images():
            if image.path not in kept_paths:
                remove(image.path)
                removed_images.append(image.path.name)
        for variant in recipe.VARIANTS:
            link = self.root / variant
            if link.is_symlink() and not link.resolve().exists():
                link.unlink()
        wanted = {f"{s.name}-{s.key[:16]}" for image in keep for s in image.manifest.stages.values()}
        removed_stages = []
        if self.stages_dir.is_dir():
            for path in sorted(self.stages_dir.iterdir()):
                if path.name not in wanted:
                    remove(path)
                    removed_stages.append(path.name)
        self.clear_scratch()
        return Pruned(removed_images, removed_stages)
