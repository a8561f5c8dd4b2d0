"""The guest image the tests' sandboxes run (scripts/test.sh builds it; tests/conftest.py points
controllers at it through BROWSERVM_IMAGE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browservm.sandbox.image import ImageStore


def image_tree(variant: str = "browser") -> Path:
    """The tree of the tests' current image; the test fails (or skips outside scripts/test.sh) without it."""
    store = ImageStore(Path(os.environ["BROWSERVM_IMAGE_DIR"]))
    image = store.current(variant)  # type: ignore[arg-type]
    if image is None:
        message = (
            f"no {variant} guest image in {store.root}: build it with "
            f"BROWSERVM_IMAGE_DIR={store.root} .venv/bin/browservm image build --variant {variant} "
            "(scripts/test.sh does)"
        )
        if os.environ.get("BROWSERVM_REQUIRE_IMAGE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return image.tree
