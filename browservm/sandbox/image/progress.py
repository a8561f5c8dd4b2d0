"""The build's progress on the terminal: a line per named step, its bar, its time, and whether it was cached."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class RichProgress:
    """Implements :class:`browservm.sandbox.image.builder.Progress` with rich, on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=None),
            TimeElapsedColumn(),
            console=self._console,
            transient=False,
            disable=not self._console.is_terminal,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._progress.__exit__(kind, error, trace)

    def begin(self, step: str, title: str) -> None:
        if not self._console.is_terminal:
            # A log (CI): a line per step as it happens, not one picture at the end.
            self._console.print(f"image build: {step}: {title} ...", highlight=False)
        # No total while running: the bar pulses (a step's length is not known beforehand).
        self._tasks[step] = self._progress.add_task(f"{step:<7} {title}", total=None)

    def end(self, step: str, *, cached: bool, seconds: float) -> None:
        task = self._tasks[step]
        if not self._console.is_terminal:
            self._console.print(
                f"image build: {step}: {'cached' if cached else f'{seconds:.1f} s'}", highlight=False
            )
        note = "[dim](cached)" if cached else f"[dim]({seconds:.1f} s)"
        description = self._progress.tasks[task].description
        self._progress.update(task, total=1, completed=1, description=f"{description} {note}")
        self._progress.stop_task(task)
