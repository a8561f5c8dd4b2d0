"""A user's persistent CLI VM, where their credentials land: create, read, run commands, hibernate,
resume, delete."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
from pydantic import TypeAdapter

from browservm_client import _sse
from browservm_client._operations import operation
from browservm_client._transport import AsyncTransport, Request, Transport, path
from browservm_client.errors import ExecInterrupted
from browservm_client.models import EXEC_EVENTS, CliVmOut, CliVmOutput, ExecExit, ExecFailure, ExecOutput

CLI_VM = "/v1/users/{user_id}/cli-vm"
HIBERNATE = "/v1/users/{user_id}/cli-vm/hibernate"
RESUME = "/v1/users/{user_id}/cli-vm/resume"
EXEC = "/v1/users/{user_id}/cli-vm/exec"
OUTPUT = "/v1/users/{user_id}/cli-vm/output"
ALL = "/v1/cli-vms"

OnOutput = Callable[[ExecOutput], object]


@dataclass
class ExecResult:
    """A finished command: its exit code and everything it wrote, in order."""

    exit_code: int
    """Negative: killed by that signal (a timeout is -9 with ``timed_out``)."""
    timed_out: bool
    output: list[ExecOutput] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "".join(chunk.data for chunk in self.output if chunk.stream == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(chunk.data for chunk in self.output if chunk.stream == "stderr")


class _ExecReader:
    """Turns the exec stream's events into output chunks and, at the end, an :class:`ExecResult`."""

    def __init__(self, user_id: str, on_output: OnOutput | None) -> None:
        self.user_id = user_id
        self.on_output = on_output
        self.output: list[ExecOutput] = []
        self.decoder = _sse.Decoder()

    def feed(self, line: str) -> ExecResult | None:
        sse = self.decoder.feed(line)
        model = EXEC_EVENTS.get(sse.event) if sse is not None else None
        if sse is None or model is None:
            return None  # pings, and kinds of events a newer controller may add
        event = model.model_validate(json.loads(sse.data))
        if isinstance(event, ExecOutput):
            self.output.append(event)
            if self.on_output is not None:
                self.on_output(event)
        elif isinstance(event, ExecExit):
            return ExecResult(event.exit_code, event.timed_out, self.output)
        elif isinstance(event, ExecFailure):
            raise ExecInterrupted(self.user_id, event.message, self.output)
        return None

    def cut(self, detail: str) -> ExecInterrupted:
        return ExecInterrupted(self.user_id, detail, self.output)


def _exec_request(
    transport: Transport | AsyncTransport,
    user_id: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    timeout_s: float,
) -> Request:
    if isinstance(argv, str):
        raise TypeError("argv is a list of arguments, e.g. ['ls', '-l'], not a string")
    body = {"argv": list(argv), "env": dict(env or {}), "timeout_s": timeout_s}
    # A POST: resent only if it never reached the controller, or after a 429/503 (nothing started).
    return Request("POST", path(EXEC, user_id=user_id), json=body, timeout=transport.config.stream_timeout())


class CliVms:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def _vm(self, method: str, route: str, user_id: str) -> CliVmOut:
        response = self._t.send(Request(method, path(route, user_id=user_id)))
        return CliVmOut.model_validate_json(response.content)

    @operation("POST", CLI_VM)
    def create(self, user_id: str) -> CliVmOut:
        """Create the user's CLI VM; their stored credentials are delivered into it at once.
        ``Conflict`` (``cli_vm_exists``) if they have one."""
        return self._vm("POST", CLI_VM, user_id)

    @operation("GET", CLI_VM)
    def get(self, user_id: str) -> CliVmOut:
        return self._vm("GET", CLI_VM, user_id)

    @operation("GET", ALL)
    def list(self) -> list[CliVmOut]:
        """Every CLI VM of your tenant."""
        return _vm_list(self._t.send(Request("GET", ALL)).content)

    @operation("GET", OUTPUT)
    def output(self, user_id: str) -> CliVmOutput:
        """What the last commands run through :meth:`exec` printed, newest first (kept in memory only)."""
        return CliVmOutput.model_validate_json(
            self._t.send(Request("GET", path(OUTPUT, user_id=user_id))).content
        )

    @operation("POST", HIBERNATE)
    def hibernate(self, user_id: str) -> CliVmOut:
        """Stop its compute, keep its disk."""
        return self._vm("POST", HIBERNATE, user_id)

    @operation("POST", RESUME)
    def resume(self, user_id: str) -> CliVmOut:
        return self._vm("POST", RESUME, user_id)

    @operation("DELETE", CLI_VM)
    def delete(self, user_id: str) -> None:
        self._t.send(Request("DELETE", path(CLI_VM, user_id=user_id)))

    @operation("POST", EXEC)
    def exec(
        self,
        user_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        on_output: OnOutput | None = None,
    ) -> ExecResult:
        """Run ``argv`` as the CLI user; ``on_output`` gets each chunk as it comes. Returns the exit code
        and the whole output. ``timeout_s`` is the command's: past it the CLI VM kills it."""
        reader = _ExecReader(user_id, on_output)
        try:
            with self._t.stream(_exec_request(self._t, user_id, argv, env, timeout_s)) as response:
                for line in response.iter_lines():
                    result = reader.feed(line)
                    if result is not None:
                        return result
        except httpx.TransportError as exc:
            raise reader.cut(f"{type(exc).__name__}: {exc}") from exc
        raise reader.cut("the stream ended before the exit code")


class AsyncCliVms:
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def _vm(self, method: str, route: str, user_id: str) -> CliVmOut:
        response = await self._t.send(Request(method, path(route, user_id=user_id)))
        return CliVmOut.model_validate_json(response.content)

    @operation("POST", CLI_VM)
    async def create(self, user_id: str) -> CliVmOut:
        """Create the user's CLI VM; their stored credentials are delivered into it at once.
        ``Conflict`` (``cli_vm_exists``) if they have one."""
        return await self._vm("POST", CLI_VM, user_id)

    @operation("GET", CLI_VM)
    async def get(self, user_id: str) -> CliVmOut:
        return await self._vm("GET", CLI_VM, user_id)

    @operation("GET", ALL)
    async def list(self) -> list[CliVmOut]:
        """Every CLI VM of your tenant."""
        return _vm_list((await self._t.send(Request("GET", ALL))).content)

    @operation("GET", OUTPUT)
    async def output(self, user_id: str) -> CliVmOutput:
        """What the last commands run through :meth:`exec` printed, newest first (kept in memory only)."""
        response = await self._t.send(Request("GET", path(OUTPUT, user_id=user_id)))
        return CliVmOutput.model_validate_json(response.content)

    @operation("POST", HIBERNATE)
    async def hibernate(self, user_id: str) -> CliVmOut:
        """Stop its compute, keep its disk."""
        return await self._vm("POST", HIBERNATE, user_id)

    @operation("POST", RESUME)
    async def resume(self, user_id: str) -> CliVmOut:
        return await self._vm("POST", RESUME, user_id)

    @operation("DELETE", CLI_VM)
    async def delete(self, user_id: str) -> None:
        await self._t.send(Request("DELETE", path(CLI_VM, user_id=user_id)))

    @operation("POST", EXEC)
    async def exec(
        self,
        user_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        on_output: OnOutput | None = None,
    ) -> ExecResult:
        """Run ``argv`` as the CLI user; ``on_output`` gets each chunk as it comes. Returns the exit code
        and the whole output. ``timeout_s`` is the command's: past it the CLI VM kills it."""
        reader = _ExecReader(user_id, on_output)
        try:
            async with self._t.stream(_exec_request(self._t, user_id, argv, env, timeout_s)) as response:
                async for line in response.aiter_lines():
                    result = reader.feed(line)
                    if result is not None:
                        return result
        except httpx.TransportError as exc:
            raise reader.cut(f"{type(exc).__name__}: {exc}") from exc
        raise reader.cut("the stream ended before the exit code")


_VM_LIST: TypeAdapter[list[CliVmOut]] = TypeAdapter(list[CliVmOut])


def _vm_list(content: bytes) -> list[CliVmOut]:
    return _VM_LIST.validate_json(content)
