"""The recent commands of each CLI VM and the tail of their output, for the operator to look back at
(``GET /v1/users/{user_id}/cli-vm/output``, the dashboard's "output" button).

Kept in the controller's memory only, bounded (the last few runs per VM, the last 64 KiB of each), and
forgotten with the VM: output is the user's data and may hold secrets their tools print, so it is
neither logged nor stored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

RUNS_PER_VM = 10
TAIL_CHARS = 64 * 1024


@dataclass
class ExecRun:
    exec_id: str
    argv: list[str]
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ended_at: datetime | None = None
    exit_code: int | None = None
    timed_out: bool = False
    output: str = ""
    """stdout and stderr interleaved as they came, cut to the last :data:`TAIL_CHARS`."""
    truncated: bool = False

    def add(self, data: str) -> None:
        self.output += data
        if len(self.output) > TAIL_CHARS:
            self.output = self.output[-TAIL_CHARS:]
            self.truncated = True

    def finish(self, exit_code: int | None, timed_out: bool) -> None:
        self.exit_code, self.timed_out, self.ended_at = exit_code, timed_out, datetime.now(UTC)


class ExecHistory:
    def __init__(self, runs_per_vm: int = RUNS_PER_VM) -> None:
        self._runs: dict[tuple[str, str], deque[ExecRun]] = {}
        self._runs_per_vm = runs_per_vm

    def start(self, tenant: str, user_id: str, exec_id: str, argv: list[str]) -> ExecRun:
        run = ExecRun(exec_id=exec_id, argv=list(argv))
        self._runs.setdefault((tenant, user_id), deque(maxlen=self._runs_per_vm)).append(run)
        return run

    def recent(self, tenant: str, user_id: str) -> list[ExecRun]:
        """Newest first."""
        return list(reversed(self._runs.get((tenant, user_id), ())))

    def forget(self, tenant: str, user_id: str) -> None:
        self._runs.pop((tenant, user_id), None)
