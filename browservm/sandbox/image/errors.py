"""The one error an image build raises: which step failed, why, and what the step printed last."""

from __future__ import annotations


class ImageBuildError(Exception):
    def __init__(self, step: str, reason: str, output_tail: str = "") -> None:
        message = f"image build step {step!r} failed: {reason}"
        if output_tail.strip():
            message += "\n--- last lines of its output ---\n" + output_tail.rstrip()
        super().__init__(message)
        self.step = step
        self.reason = reason
        self.output_tail = output_tail
