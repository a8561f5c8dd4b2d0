"""The minimal guest image, built once per test run into a store outside the checkout.

The store is ``$BROWSERVM_TEST_IMAGE_DIR``, by default ``$BROWSERVM_CACHE/test-images``: kept between runs
(CI caches ``BROWSERVM_CACHE``), so a run whose recipe did not change builds nothing, and one whose agent
code changed rebuilds the guest stage only. Building needs root and mmdebstrap; without them the image
tests skip, unless ``BROWSERVM_REQUIRE_IMAGE=1`` (``scripts/test.sh`` sets it) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from browservm.sandbox.image import BuildResult, Caches, ImageBuilder, ImageStore, Recipe
from browservm.settings import load_settings

REQUIRE_IMAGE = os.environ.get("BROWSERVM_REQUIRE_IMAGE") == "1"


def _missing() -> str:
    if os.geteuid() != 0:
        return "image builds run as root"
    for program in ("mmdebstrap", "bwrap", "mkfs.ext4", "depmod"):
        if shutil.which(program) is None:
            return f"{program} is not installed (scripts/setup.sh installs it)"
    return ""


@pytest.fixture(scope="session")
def image_store() -> ImageStore:
    why = _missing()
    if why:
        if REQUIRE_IMAGE:
            pytest.fail(f"BROWSERVM_REQUIRE_IMAGE=1 but {why}")
        pytest.skip(why)
    settings = load_settings()
    root = os.environ.get("BROWSERVM_TEST_IMAGE_DIR") or str(settings.cache / "test-images")
    return ImageStore(Path(root))


@pytest.fixture(scope="session")
def image_caches() -> Caches:
    return Caches.under(load_settings().cache)


@pytest.fixture(scope="session")
def minimal_build(image_store: ImageStore, image_caches: Caches) -> BuildResult:
    started = time.monotonic()
    result = ImageBuilder(image_store, image_caches).build(Recipe("minimal"))
    # Older test images (an earlier commit's agent code) go: only the current one is kept.
    with image_store.locked():
        image_store.prune()
    print(
        f"\nminimal image: {result.image.path.name}, stages run: {result.rebuilt or 'none'}, "
        f"{time.monotonic() - started:.1f} s"
    )
    return result
